"""The tiny tokenizer and model with a chat template, for data with chat messages."""

from pathlib import Path

from tiny import save_tiny_model, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '>\\n' + message['content'] + '<|endoftext|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\\n' }}{% endif %}"
)
"""A chat template in the style of ChatML for the tiny tokenizer, whose one special token ends each turn."""


def tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with `TINY_CHAT_TEMPLATE` as its chat template."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def save_tiny_chat_model(folder: Path, family: str = "llama", layers: int = 4) -> Path:
    """A tiny random model saved as a Hugging Face folder whose tokenizer has `TINY_CHAT_TEMPLATE`."""
    save_tiny_model(folder, family, layers)
    tiny_chat_tokenizer().save_pretrained(folder)
    return folder
