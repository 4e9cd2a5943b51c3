"""The tiny models' names as the tests import them; they live in `qra.testing`."""

from qra.testing import VOCAB, save_tiny_model, tiny_config, tiny_corpus, tiny_spec, tiny_tokenizer

__all__ = ["VOCAB", "save_tiny_model", "tiny_config", "tiny_corpus", "tiny_spec", "tiny_tokenizer"]
