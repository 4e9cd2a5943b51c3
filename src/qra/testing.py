"""Tiny random Llama / Qwen2 models, a tiny real tokenizer and a small corpus, built in seconds: for the
tests, the benchmarks' dry runs and the experiments.

Dimensions are multiples of 32 because gptqmodel packs 3-bit codes in 32-column blocks.
"""

import json
from pathlib import Path

import pydoc_data.topics
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from qra.plans.spec import ModelSpec, spec_from_config

VOCAB = 320


def tiny_config(family: str = "llama", layers: int = 4) -> LlamaConfig | Qwen2Config:
    """A Llama or Qwen2 config of `layers` layers, hidden size 128, vocabulary `VOCAB`."""
    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=family == "llama",
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


def tiny_spec(family: str = "llama", layers: int = 4) -> ModelSpec:
    """The `ModelSpec` of `tiny_config(family, layers)`."""
    return spec_from_config(tiny_config(family, layers))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the Python reference that ships with CPython."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(pydoc_data.topics.topics.values())[:200], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def save_tiny_model(folder: Path, family: str = "llama", layers: int = 4, seed: int = 0) -> Path:
    """A tiny random model with tokenizer, saved as a Hugging Face folder."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_corpus(path: Path, examples: int = 60, characters: int = 400) -> Path:
    """A small JSONL of plain text (the first topics of the Python reference, cut short): `--data` for
    tests that run many fine-tunes, whose held-out set (a tenth) is then a few dozen sequences."""
    texts = [text[:characters] for _, text in sorted(pydoc_data.topics.topics.items())[:examples]]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path
