"""Training and evaluation data: files, saved data sets or bundled sets, tokenized into deterministic batches.

`--data` is a data file, a folder written by `datasets.save_to_disk`, or a bundled name: `python-reference`
(CPython's language reference, for domain adaptation) or `arithmetic` (a generated question/answer task
with exact answers), or several of these joined by `+` (`python-reference+arithmetic`): their training sets
and their held-out sets, each concatenated. A `.jsonl` file (or any file of another suffix) is read line by
line here; `.json`, `.csv` and `.parquet` files and saved folders are read by Hugging Face `datasets`, from
disk only. Each line or row is one record of one of three shapes, found by its fields:

- `{"text": ...}`: plain text, an `Example` with an empty prompt; the loss falls on all of it;
- `{"prompt": ..., "response": ...}`: an `Example`, the loss on the response only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a `Conversation` (the OpenAI/TRL chat convention),
  rendered with the tokenizer's own chat template, the loss on the assistant turns only, each with its
  end-of-turn token (`tokenize_conversations`).

`Fields` renames the text and messages fields (`--text-field`, `--messages-field`). A held-out file
(`--held-out`) may be of any of these formats.

Sequence length: the functions here cut to any `seq_len`; checking it against the model's
`tokenizer.model_max_length` (when that is a real limit, below 1e9) is the caller's job.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import pydoc_data.topics
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qra.errors import QraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from qra.plans.schema import Training

log = logging.getLogger(__name__)

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


ROLES = ("system", "user", "assistant", "tool")
"""The roles a conversation's messages may have (the OpenAI/TRL convention)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """Chat messages to render with the model's chat template, the loss on the assistant turns; `origin` (the
    file and its line or row) names the record in errors and takes no part in equality."""

    messages: tuple[Message, ...]
    origin: str = field(default="", compare=False)

    @property
    def is_text(self) -> bool:
        return False


Record = Example | Conversation
"""One training or held-out record: a prompt and response (plain text: an empty prompt), or a conversation."""


@dataclass(frozen=True)
class Fields:
    """The names of the fields (columns) that hold plain text and chat messages (`--text-field`,
    `--messages-field`); prompt/response records always use `prompt` and `response`."""

    text: str = "text"
    messages: str = "messages"


@dataclass(frozen=True)
class Dataset:
    """Records to train on and records held out for evaluation, never overlapping; a joined set
    (`a+b`) keeps its parts, so each task's held-out records can be scored on their own."""

    name: str
    train: list[Record]
    held_out: list[Record]
    parts: tuple["Dataset", ...] = ()

    def held_out_by_task(self) -> dict[str, list[Record]]:
        """Each part's held-out examples by its name; a set that is not joined is one task."""
        if not self.parts:
            return {self.name: self.held_out}
        return {part.name: part.held_out for part in self.parts}


def load_dataset(
    spec: str, held_out: str | None = None, seed: int = 0, held_out_fraction: float = 0.1, fields: Fields = Fields()
) -> Dataset:
    """The data named by `--data`: a bundled name, a data file or a saved folder (see the module docstring).

    A file gives up a seeded `held_out_fraction` of its records (at least one when it has two or more), and a
    saved `DatasetDict` its `validation` or `test` split, unless `held_out` names a file or folder of its own,
    which then is the held-out set, for any source.
    """
    held = None if held_out is None else read_held_out(held_out, fields)
    if spec in BUNDLED:
        dataset = BUNDLED[spec](seed)
        return dataset if held is None else Dataset(dataset.name, dataset.train, held)
    if Path(spec).exists() or (_looks_like_path(spec) and "+" not in spec):
        records, split = _read(spec, fields)
        if held is not None:
            return Dataset(spec, records, held)
        if split is not None:
            return Dataset(spec, records, split)
        return _split(spec, records, seed, held_out_fraction)
    if "+" in spec:
        parts = [load_dataset(part, seed=seed, held_out_fraction=held_out_fraction, fields=fields) for part in spec.split("+")]
        train = [e for part in parts for e in part.train]
        if held is not None:
            return Dataset(spec, train, held)
        return Dataset(spec, train, [e for part in parts for e in part.held_out], tuple(parts))
    raise QraError(f"unknown data {spec!r}: not a file, and the bundled data sets are {', '.join(sorted(BUNDLED))}")


def has_conversations(dataset: Dataset) -> bool:
    """Whether any record of the data set, training or held out, is a conversation."""
    return any(isinstance(record, Conversation) for record in [*dataset.train, *dataset.held_out])


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix != ""


TABLES = {".json": ("JSON", "from_json"), ".csv": ("CSV", "from_csv"), ".parquet": ("Parquet", "from_parquet")}
"""The file suffixes that Hugging Face `datasets` reads, with the format's name and its reader."""

HELD_OUT_SPLITS = ("validation", "test")
"""The splits of a saved `DatasetDict` that are its held-out set, the first present."""


def read_records(path: str, fields: Fields = Fields()) -> list[Record]:
    """Every record of a data file or saved folder (of a saved `DatasetDict`, its training split), or a
    QraError naming the file and the line or row at fault."""
    return _read(path, fields)[0]


def read_held_out(path: str, fields: Fields = Fields()) -> list[Record]:
    """The records of a held-out file or saved folder (of a saved `DatasetDict`, its held-out split)."""
    records, held = _read(path, fields)
    return records if held is None else held


def _read(path: str, fields: Fields) -> tuple[list[Record], list[Record] | None]:
    """The records of `path`, and the held-out split of a saved `DatasetDict` that has one (else None)."""
    location = Path(path)
    if location.is_dir():
        return _read_saved(path, fields)
    if location.suffix.lower() in TABLES:
        return _read_table(path, fields), None
    return read_jsonl(path, fields), None


def read_jsonl(path: str, fields: Fields = Fields()) -> list[Record]:
    """Every record of a JSONL file, or a QraError naming the file and the line at fault."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QraError(f"data file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise QraError(f"data file {path} cannot be read: {error}") from None
    examples = [_parse_line(path, number, line, fields) for number, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise QraError(f"{path} has no examples")
    return examples


def _parse_line(path: str, number: int, line: str, fields: Fields) -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise QraError(f"{path} line {number} is not JSON: {error.msg} (column {error.colno})") from None
    return _parse_record(f"{path} line {number}", record, fields)


def _parse_record(where: str, record: object, fields: Fields) -> Record:
    """The record's shape, found by its fields: messages, else prompt/response, else text."""
    if isinstance(record, Mapping):
        if record.get(fields.messages) is not None:
            return _conversation(where, record[fields.messages], fields.messages)
        if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            return Example(record["prompt"], record["response"])
        if isinstance(record.get(fields.text), str):
            return Example("", record[fields.text])
    raise QraError(f"{where} has neither {fields.text} nor prompt/response (strings) nor {fields.messages} (a list of {{role, content}})")


def _conversation(where: str, messages: object, name: str) -> Conversation:
    """The record's messages as a Conversation: a non-empty list of {role, content} with string values (in a
    CSV file, that list as JSON text), every role one of `ROLES`, at least one assistant turn."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise QraError(f"{where}: {name} is text but not JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(messages, list) or not messages:
        raise QraError(f"{where}: {name} is not a non-empty list of {{role, content}} messages")
    turns = []
    for index, message in enumerate(messages, 1):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise QraError(f"{where}: message {index} is not a {{role, content}} object with string values")
        if message["role"] not in ROLES:
            raise QraError(f"{where}: message {index} has role {message['role']!r}, not one of {', '.join(ROLES)}")
        turns.append(Message(message["role"], message["content"]))
    if not any(turn.role == "assistant" for turn in turns):
        raise QraError(f"{where}: the conversation has no assistant turn to learn from")
    return Conversation(tuple(turns), where)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """The `datasets` module with its progress bars off and its log quiet below CRITICAL (a file it cannot
    read is reported by the caller, in one line), both restored afterwards."""
    import datasets
    from datasets.utils import logging as datasets_logging

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets_logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets_logging.set_verbosity(logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _read_table(path: str, fields: Fields) -> list[Record]:
    """Every row of a `.json`, `.csv` or `.parquet` file, read by `datasets` into memory (its cache in a
    temporary folder, removed after)."""
    kind, reader = TABLES[Path(path).suffix.lower()]
    location = Path(path)
    if not location.is_file():
        raise QraError(f"data file {path} not found")
    if location.stat().st_size == 0:
        raise QraError(f"{path} has no examples")
    import pyarrow

    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="qra-data-") as cache:
        try:
            table = getattr(datasets.Dataset, reader)(str(location), cache_dir=cache, keep_in_memory=True)
        except (OSError, ValueError, pyarrow.ArrowException, datasets.exceptions.DatasetsError) as error:
            if "corresponds to no data" in str(error):  # datasets' word for a file of no rows (a CSV header alone)
                raise QraError(f"{path} has no examples") from None
            raise QraError(f"data file {path} cannot be read as {kind}: {_error_line(error)}") from None
    return _parse_rows(path, table, fields)


def _read_saved(path: str, fields: Fields) -> tuple[list[Record], list[Record] | None]:
    """A folder written by `save_to_disk`: a `Dataset`, or a `DatasetDict` whose `train` split (or only
    split) is the data and whose `validation` or `test` split, where it has one, the held-out set."""
    with _quiet_datasets() as datasets:
        try:
            saved = datasets.load_from_disk(path)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
            raise QraError(f"data folder {path} is not a data set saved by datasets.save_to_disk: {_error_line(error)}") from None
    if isinstance(saved, datasets.Dataset):
        return _parse_rows(path, saved, fields), None
    held = next((name for name in HELD_OUT_SPLITS if name in saved), None)
    train = "train" if "train" in saved else next(iter(saved)) if len(saved) == 1 else None
    if train is None:
        raise QraError(f"data folder {path} has splits {', '.join(saved)}: none is named train")
    records = _parse_rows(f"{path} split {train}", saved[train], fields)
    return records, None if held is None else _parse_rows(f"{path} split {held}", saved[held], fields)


def _parse_rows(where: str, table: Any, fields: Fields) -> list[Record]:
    records = [_parse_record(f"{where} row {number}", row, fields) for number, row in enumerate(table, 1)]
    if not records:
        raise QraError(f"{where} has no examples")
    return records


def _error_line(error: BaseException) -> str:
    """The first line of a library's error message (its type's name where it has none)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _split(name: str, examples: list[Record], seed: int, fraction: float) -> Dataset:
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


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """A QraError unless the tokenizer has a chat template, which conversations are rendered with."""
    if not getattr(tokenizer, "chat_template", None):
        raise QraError(
            "the model's tokenizer has no chat template, and data with messages is rendered with it: "
            "use a model that has one, or give the data as text or prompt/response"
        )


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special tokens as text (named ones such as EOS and every added token marked special)."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return sorted({*tokenizer.all_special_tokens, *added} - {""})


def _render(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, count: int, generation_prompt: bool = False) -> str:
    """The chat template applied to the conversation's first `count` messages, as text."""
    from jinja2 import TemplateError

    messages = [asdict(message) for message in conversation.messages[:count]]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
        raise QraError(f"{conversation.origin}: the model's chat template cannot render this conversation: {_error_line(error)}") from None


def _end_of_turn(text: str, start: int, stop: int, specials: Sequence[str]) -> int:
    """Where the first special token in `text[start:stop]` ends (the end-of-turn token that follows an
    assistant's content); `stop` where the template puts none there."""
    hits = [(at, at + len(token)) for token in specials if (at := text.find(token, start, stop)) >= 0]
    return min(hits, key=lambda hit: (hit[0], -hit[1]))[1] if hits else stop


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, specials: Sequence[str]
) -> tuple[str, list[tuple[int, int]], list[int]]:
    """The whole conversation rendered, the character span the loss falls on in each assistant turn, and
    where each assistant turn's text ends.

    A turn's span starts where the template applied to the messages before it, with the generation prompt,
    ends (what a model generates from there) and runs through the assistant's content and the first special
    token after it, its end-of-turn token (the turn's whole text where there is none). The template must
    render turn by turn: the messages before a turn render as a prefix of the conversation."""
    whole = _render(tokenizer, conversation, len(conversation.messages))
    spans, ends = [], []
    for index, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        prompt = _render(tokenizer, conversation, index, generation_prompt=True)
        turn = _render(tokenizer, conversation, index + 1)
        if not (whole.startswith(turn) and turn.startswith(prompt)):
            raise QraError(
                f"{conversation.origin}: the model's chat template does not render this conversation turn by turn "
                f"(the messages before turn {index + 1} do not render as a prefix of it), so its assistant turns cannot be found"
            )
        content = message.content.strip()
        found = whole.find(content, len(prompt), len(turn)) if content else -1
        after = found + len(content) if found >= 0 else len(prompt)
        spans.append((len(prompt), _end_of_turn(whole, after, len(turn), specials)))
        ends.append(len(turn))
    return whole, spans, ends


def _conversation_tokens(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, specials: Sequence[str]
) -> tuple[list[int], list[int], list[int]]:
    """The conversation's token ids, its labels (IGNORE_INDEX outside the assistant spans) and the token
    count at the end of each assistant turn. The text is tokenized in pieces cut at the spans' and turns'
    edges, as generation meets it: the prompt up to the generation prompt, then what the model writes."""
    whole, spans, ends = _assistant_spans(tokenizer, conversation, specials)
    edges = sorted({0, len(whole), *(edge for span in spans for edge in span), *ends})
    pieces = list(itertools.pairwise(edges))
    tokens = tokenizer([whole[start:stop] for start, stop in pieces], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    turn_ends = []
    for (start, stop), ids in zip(pieces, tokens):
        trained = any(first <= start and stop <= last for first, last in spans)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if stop in ends:
            turn_ends.append(len(input_ids))
    return input_ids, labels, turn_ends


def tokenize_conversations(conversations: Sequence[Conversation], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Feature]:
    """One feature per conversation, rendered with the tokenizer's chat template, the labels on each
    assistant turn's tokens and its end-of-turn token and nowhere else (multi-turn conversations train on
    every assistant turn).

    A conversation longer than `seq_len` is cut after the last assistant turn that fits; where even the first
    does not fit, at `seq_len` inside it; one with no assistant token within `seq_len` is dropped. How many
    were cut is logged (a warning)."""
    require_chat_template(tokenizer)
    specials = _special_tokens(tokenizer)
    features, at_turn, inside, dropped = [], 0, 0, 0
    for conversation in conversations:
        input_ids, labels, turn_ends = _conversation_tokens(tokenizer, conversation, specials)
        if len(input_ids) > seq_len:
            fitting = [end for end in turn_ends if end <= seq_len]
            cut = fitting[-1] if fitting else seq_len
            input_ids, labels = input_ids[:cut], labels[:cut]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1
                continue
            at_turn, inside = at_turn + bool(fitting), inside + (not fitting)
        features.append({"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)})
    if at_turn or inside or dropped:
        log.warning(
            "%d of %d conversations are longer than %d tokens: %d cut after their last assistant turn that fits, "
            "%d cut inside their first assistant turn, %d dropped (no assistant token within %d)",
            at_turn + inside + dropped, len(conversations), seq_len, at_turn, inside, dropped, seq_len,
        )
    return features


def training_features(examples: Sequence[Record], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Feature]:
    """How `qra materialize` and the search tokenize: plain text packed into full blocks, prompt/response
    examples one per sequence with the loss on the response, conversations one per sequence with the loss on
    the assistant turns (a mixed set: the packed blocks, then the pairs, then the conversations)."""
    texts = [example for example in examples if example.is_text]
    pairs = [example for example in examples if isinstance(example, Example) and not example.is_text]
    chats = [example for example in examples if isinstance(example, Conversation)]
    features = (pack_text(texts, tokenizer, seq_len) if texts else []) + (tokenize_examples(pairs, tokenizer, seq_len) if pairs else [])
    return features + (tokenize_conversations(chats, tokenizer, seq_len) if chats else [])


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
    """Whether a training batch of `dataset` can be padded: when it has prompt/response examples or
    conversations (one sequence each, of its own length) and a batch holds more than one sequence. Plain
    text alone is packed into full blocks and never pads. (Records that all cut to one length would not pad
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
