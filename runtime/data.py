"""Training and evaluation data: JSONL files or bundled sets, tokenized into deterministic batches.

`--data` is either a JSONL file, each line `{"text": ...}` or `{"prompt": ..., "response": ...}`, or a bundled
name: `python-reference` (CPython's language reference, for domain adaptation) or `arithmetic` (a generated
question/answer task with exact answers), or several of these joined by `+` (`python-reference+arithmetic`):
their training sets and their held-out sets, each concatenated. Every example is a prompt and a response and the loss falls on the
response only; plain text is an example with an empty prompt, so the loss falls on all of it.

Sequence length: the functions here cut to any `seq_len`; checking it against the model's
`tokenizer.model_max_length` (when that is a real limit, below 1e9) is the caller's job.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydoc_data.topics
import torch

from qra.errors import QraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from qra.plans.schema import Training

IGNORE_INDEX = -100
"""The label that the loss skips: prompt tokens and padding."""

Feature = dict[str, list[int]]
"""One tokenized sequence, unpadded: input_ids, labels and attention_mask of equal length."""

Batch = dict[str, torch.Tensor]
"""Padded LongTensors of shape (batch, length): input_ids, labels and attention_mask."""


@dataclass(frozen=True)
class Example:
    """A prompt and the response the model should learn to give; plain text has an empty prompt."""

    prompt: str
    response: str

    @property
    def is_text(self) -> bool:
        return self.prompt == ""


@dataclass(frozen=True)
class Dataset:
    """Examples to train on and examples held out for evaluation, never overlapping; a joined set
    (`a+b`) keeps its parts, so each task's held-out examples can be scored on their own."""

    name: str
    train: list[Example]
    held_out: list[Example]
    parts: tuple["Dataset", ...] = ()

    def held_out_by_task(self) -> dict[str, list[Example]]:
        """Each part's held-out examples by its name; a set that is not joined is one task."""
        if not self.parts:
            return {self.name: self.held_out}
        return {part.name: part.held_out for part in self.parts}


def load_dataset(spec: str, held_out: str | None = None, seed: int = 0, held_out_fraction: float = 0.1) -> Dataset:
    """The data named by `--data`: a bundled name or a JSONL file.

    A JSONL file gives up a seeded `held_out_fraction` of its examples (at least one when it has two or
    more) unless `held_out` names a separate JSONL file, which then is the held-out set, for any source.
    """
    if spec in BUNDLED:
        dataset = BUNDLED[spec](seed)
        return dataset if held_out is None else Dataset(dataset.name, dataset.train, read_jsonl(held_out))
    if Path(spec).exists() or (_looks_like_path(spec) and "+" not in spec):
        examples = read_jsonl(spec)
        if held_out is None:
            return _split(spec, examples, seed, held_out_fraction)
        return Dataset(spec, examples, read_jsonl(held_out))
    if "+" in spec:
        parts = [load_dataset(part, seed=seed, held_out_fraction=held_out_fraction) for part in spec.split("+")]
        train = [e for part in parts for e in part.train]
        if held_out is not None:
            return Dataset(spec, train, read_jsonl(held_out))
        return Dataset(spec, train, [e for part in parts for e in part.held_out], tuple(parts))
    raise QraError(f"unknown data {spec!r}: not a file, and the bundled data sets are {', '.join(sorted(BUNDLED))}")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix != ""


def read_jsonl(path: str) -> list[Example]:
    """Every example of a JSONL file, or a QraError naming the file and the line at fault."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QraError(f"data file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise QraError(f"data file {path} cannot be read: {error}") from None
    examples = [_parse_line(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise QraError(f"{path} has no examples")
    return examples


def _parse_line(path: str, number: int, line: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise QraError(f"{path} line {number} is not JSON: {error.msg} (column {error.colno})") from None
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            return Example(record["prompt"], record["response"])
        if isinstance(record.get("text"), str):
            return Example("", record["text"])
    raise QraError(f"{path} line {number} has neither text nor prompt/response (strings)")


def _split(name: str, examples: list[Example], seed: int, fraction: float) -> Dataset:
    """Hold out a seeded `fraction` of `examples`; both parts keep the file's order."""
    if not 0 <= fraction < 1:
        raise QraError(f"held-out fraction must be at least 0 and below 1, got {fraction}")
    count = 0 if len(examples) < 2 or fraction == 0 else min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return Dataset(
        name,
        [example for index, example in enumerate(examples) if index not in held],
        [example for index, example in enumerate(examples) if index in held],
    )


def python_reference(seed: int = 0) -> Dataset:
    """CPython's language reference as plain text, one example per topic; every 5th topic (by name) is held out.

    The split is fixed, so `seed` is unused; it is accepted so that every bundled set loads alike.
    """
    topics = sorted(pydoc_data.topics.topics.items())
    train = [Example("", text) for index, (_, text) in enumerate(topics) if index % 5 != 4]
    held_out = [Example("", text) for index, (_, text) in enumerate(topics) if index % 5 == 4]
    return Dataset("python-reference", train, held_out)


UNITS = [
    ("centimeters", "meters", 100),
    ("meters", "kilometers", 1000),
    ("grams", "kilograms", 1000),
    ("milliliters", "liters", 1000),
    ("minutes", "hours", 60),
    ("seconds", "minutes", 60),
]


def _sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", a + b


def _difference(rng: random.Random) -> tuple[str, int]:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"What is {a} - {b}?", a - b


def _product(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return f"What is {a} * {b}?", a * b


def _conversion(rng: random.Random) -> tuple[str, int]:
    small, large, factor = rng.choice(UNITS)
    amount = rng.randint(1, 200)
    return f"How many {small} are in {amount} {large}?", amount * factor


QUESTIONS: list[Callable[[random.Random], tuple[str, int]]] = [_sum, _difference, _product, _conversion]


def arithmetic(seed: int = 0, train_size: int = 2000, held_out_size: int = 600) -> Dataset:
    """Distinct generated questions with exact answers, e.g. prompt "Q: What is 37 + 58?\\nA:", response " 95".

    600 held-out questions give about 2,900 scored answer tokens with SmolLM2's tokenizer: enough that the
    task's held-out loss has a standard error well below the effects a plan is chosen on (with 32 questions,
    ~80 tokens, one layer's bits moved it by ±0.3 from seed to seed). The training questions do not depend
    on `held_out_size`: they are the first `train_size` generated."""
    rng = random.Random(seed)
    wanted = train_size + held_out_size
    questions: dict[str, int] = {}
    attempts = 0
    while len(questions) < wanted and attempts < 50 * wanted:
        attempts += 1
        question, answer = rng.choice(QUESTIONS)(rng)
        questions.setdefault(question, answer)
    if len(questions) < wanted:
        raise QraError(f"arithmetic: cannot generate {wanted} distinct questions")
    examples = [Example(f"Q: {question}\nA:", f" {answer}") for question, answer in questions.items()]
    return Dataset("arithmetic", examples[:train_size], examples[train_size:])


BUNDLED: dict[str, Callable[[int], Dataset]] = {"python-reference": python_reference, "arithmetic": arithmetic}


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise QraError("the tokenizer has no end-of-sequence token")
    return tokenizer.eos_token_id


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that pads batches: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Feature]:
    """One feature per example: prompt tokens (labels -100), then response tokens and EOS, cut to `seq_len`.

    Prompt and response are tokenized apart, as generation sees them; the prompt gets the tokenizer's special
    tokens (a BOS, for some). An example left with no response token after the cut is dropped.
    """
    prompts = tokenizer([example.prompt for example in examples])["input_ids"]
    responses = tokenizer([example.response for example in examples], add_special_tokens=False)["input_ids"]
    eos = _eos_id(tokenizer)
    features = []
    for prompt, response in zip(prompts, responses):
        input_ids = (prompt + response + [eos])[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response + [eos])[:seq_len]
        if any(label != IGNORE_INDEX for label in labels):
            features.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
    return features


def pack_text(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Feature]:
    """Plain texts joined by EOS and cut into full `seq_len` blocks, the loss on every token; the rest is dropped."""
    if not all(example.is_text for example in examples):
        raise ValueError("pack_text packs plain text only; prompt/response examples go through tokenize_examples")
    eos = _eos_id(tokenizer)
    texts = tokenizer([example.response for example in examples], add_special_tokens=False)["input_ids"]
    stream = [token for ids in texts for token in ids + [eos]]
    blocks = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
    return [{"input_ids": block, "labels": list(block), "attention_mask": [1] * seq_len} for block in blocks]


def training_features(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Feature]:
    """How `qra materialize` and the search tokenize: plain text packed into full blocks, prompt/response
    examples one per sequence with the loss on the response (a mixed set: the packed blocks, then the pairs)."""
    texts = [example for example in examples if example.is_text]
    pairs = [example for example in examples if not example.is_text]
    return (pack_text(texts, tokenizer, seq_len) if texts else []) + (tokenize_examples(pairs, tokenizer, seq_len) if pairs else [])


CALIBRATION_SEQUENCES = 32
"""GPTQ's calibration set: the first training sequences, the same for the search's quantization cache and
`qra materialize`'s gptqmodel pass (a smaller or other set left the cache's 4-bit weights measurably worse
than materialize's: docs/objective.md, "One calibration set")."""


def _calibration_features(features: Sequence[Feature]) -> list[Feature]:
    return list(features[:CALIBRATION_SEQUENCES])


def calibration_sequences(features: Sequence[Feature]) -> list[list[int]]:
    """The token ids GPTQ calibrates on: the first training sequences, in training-feature order (not the
    shuffled batch order)."""
    return [feature["input_ids"] for feature in _calibration_features(features)]


def calibration_batches(features: Sequence[Feature], batch_size: int, pad: int) -> list[Batch]:
    """`calibration_sequences`, batched in order and right-padded (GPTQ's statistics skip the padding)."""
    chosen = _calibration_features(features)
    return [_collate(chosen[start : start + batch_size], pad) for start in range(0, len(chosen), batch_size)]


def batches(features: Sequence[Feature], batch_size: int, seed: int, epoch: int, pad: int) -> list[Batch]:
    """The epoch's batches in an order fixed by (seed, epoch) alone, so a resumed run can skip to step k.

    Each batch is right-padded to its longest sequence with token `pad` (see `pad_id`), labels -100 and
    attention_mask 0 on the padding; the last batch may be smaller.
    """
    order = list(range(len(features)))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [_collate([features[index] for index in chunk], pad) for chunk in chunks]


def _collate(features: list[Feature], pad: int) -> Batch:
    length = max(len(feature["input_ids"]) for feature in features)
    fill = {"input_ids": pad, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {
        key: torch.tensor([row[key] + [value] * (length - len(row[key])) for row in features], dtype=torch.long)
        for key, value in fill.items()
    }


def exact_match(generate_fn: Callable[[str], str], examples: Sequence[Example]) -> float:
    """The share of examples whose stripped response equals the stripped first line of `generate_fn(prompt)`."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    hits = sum(_first_line(generate_fn(example.prompt)) == example.response.strip() for example in examples)
    return hits / len(examples)


def _first_line(generation: str) -> str:
    return generation.split("\n", 1)[0].strip()


def held_out_batches_by_task(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, batch_size: int, seed: int, count: int | None = None
) -> dict[str, list[Batch]]:
    """The first `count` held-out batches (all by default) of each task of the data set (each part of a
    `+`-joined set, or the set itself), tokenized as for training; a task whose examples make no sequence
    gets none."""
    pad = pad_id(tokenizer)
    return {
        task: batches(training_features(examples, tokenizer, seq_len), batch_size, seed, 0, pad)[:count]
        for task, examples in dataset.held_out_by_task().items()
    }


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch's tensors on `device` (the same batch where they are there already)."""
    return {key: value.to(device) for key, value in batch.items()}


def pads(dataset: Dataset, batch_size: int) -> bool:
    """Whether a training batch of `dataset` can be padded: when it has prompt/response examples (one
    sequence each, of its own length) and a batch holds more than one sequence. Plain text alone is packed
    into full blocks and never pads. (Prompt/response examples that all cut to one length would not pad
    either; they are counted as padding, which only overestimates.)"""
    return batch_size > 1 and any(not example.is_text for example in dataset.train)


def training_for(training: Training, dataset: Dataset) -> Training:
    """`training` with `padded_batches` set from the data, as the memory model needs it."""
    return training.model_copy(update={"padded_batches": pads(dataset, training.batch_size)})


@dataclass(frozen=True)
class BatchExtent:
    """What a batch's training step holds in memory depends on: its tokens, and whether it is padded
    (attention then runs with a mask)."""

    tokens: int
    padded: bool

    @classmethod
    def of(cls, batch: Batch) -> "BatchExtent":
        mask = batch.get("attention_mask")
        return cls(int(batch["input_ids"].numel()), mask is not None and bool((mask == 0).any()))

    def covers(self, other: "BatchExtent") -> bool:
        """Whether a step on this batch holds at least what a step on `other` holds."""
        return self.tokens >= other.tokens and (self.padded or not other.padded)


def worst_batch(candidates: Sequence[Batch]) -> Batch:
    """The batch whose training step holds the most: one that covers every other (`BatchExtent.covers`),
    else the one with the most tokens, padded before unpadded."""
    extents = [BatchExtent.of(batch) for batch in candidates]
    for batch, extent in zip(candidates, extents):
        if all(extent.covers(other) for other in extents):
            return batch
    return max(zip(candidates, extents), key=lambda pair: (pair[1].tokens, pair[1].padded))[0]


def batch_source(
    features: Sequence[Feature], batch_size: int, grad_accumulation: int, seed: int, pad: int
) -> Callable[[int, int], Batch]:
    """`batch_for(step, micro)`: micro-batch `micro` of optimizer step `step`, epoch after epoch, each epoch
    in the order `batches` gives it for (seed, epoch). Every run with the same seed sees the same batches in
    the same order, whatever it trains (common random numbers for the comparisons the search makes)."""
    per_epoch = -(-len(features) // batch_size)
    cache: dict[int, list[Batch]] = {}

    def batch_for(step: int, micro: int) -> Batch:
        epoch, position = divmod(step * grad_accumulation + micro, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = batches(features, batch_size, seed, epoch, pad)
        return cache[epoch][position]

    return batch_for
