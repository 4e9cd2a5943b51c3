"""Training data as `qra materialize --data D` meets it: JSONL, JSON, CSV and Parquet files, saved data sets or
bundled sets, split, tokenized and batched.

Every example is a prompt and a response with the loss on the response only; plain text has an empty prompt;
a conversation (`messages`) is rendered with the tokenizer's chat template, the loss on its assistant turns.
Bad input is one QraError line with exit status 2, naming the file and its line or row. Batches depend only
on (seed, epoch), so training can resume.
"""

import json
import logging
import operator
import pydoc_data.topics
import re
from pathlib import Path

import pytest
import torch
from tiny import tiny_tokenizer
from tiny_chat import tiny_chat_tokenizer

from qra.errors import QraError
from qra.plans.schema import Training
from qra.runtime.data import (
    IGNORE_INDEX,
    BatchExtent,
    Conversation,
    Example,
    Fields,
    Message,
    arithmetic,
    batches,
    exact_match,
    load_dataset,
    pack_text,
    pad_id,
    pads,
    python_reference,
    tokenize_conversations,
    tokenize_examples,
    training_features,
    training_for,
    worst_batch,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def numbered(count: int) -> list[dict]:
    return [{"text": f"example {index}"} for index in range(count)]


# --- JSONL files ---------------------------------------------------------------------------------------------


def test_jsonl_lines_are_text_or_prompt_response_mixed(tmp_path):
    records = [{"text": "def f(): pass"}, {"prompt": "Q: 2 + 2?\nA:", "response": " 4"}, {"text": "x = 1"}]
    data = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", records)), held_out_fraction=0)
    assert data.train == [Example("", "def f(): pass"), Example("Q: 2 + 2?\nA:", " 4"), Example("", "x = 1")]
    assert [example.is_text for example in data.train] == [True, False, True]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert load_dataset(str(path), held_out_fraction=0).train == [Example("", "a"), Example("", "b")]


def test_jsonl_holds_out_a_seeded_tenth_that_never_overlaps_train(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", numbered(30)))
    data = load_dataset(path, seed=1)
    assert len(data.held_out) == 3 and len(data.train) == 27
    assert not set(data.held_out) & set(data.train)
    assert load_dataset(path, seed=1) == data
    assert load_dataset(path, seed=2).held_out != data.held_out


@pytest.mark.parametrize(("count", "held"), [(1, 0), (2, 1), (5, 1), (10, 1)])
def test_at_least_one_example_is_held_out_when_there_are_two(tmp_path, count, held):
    data = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", numbered(count))))
    assert (len(data.train), len(data.held_out)) == (count - held, held)


def test_a_separate_held_out_file_replaces_the_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered(10))
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "Q", "response": "A"}])
    data = load_dataset(str(train), held_out=str(held))
    assert len(data.train) == 10 and data.held_out == [Example("Q", "A")]


# --- bad input: one line, exit status 2 ----------------------------------------------------------------------


def bad_input(tmp_path: Path, name: str) -> tuple[str, str]:
    """A --data value and the text its error must contain."""
    path = tmp_path / "d.jsonl"
    if name == "missing":
        return str(tmp_path / "absent.jsonl"), "absent.jsonl not found"
    if name == "not json":
        path.write_text('{"text": "fine"}\n{"text": oops}\n')
        return str(path), "line 2 is not JSON"
    if name == "neither shape":
        path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"prompt": "only a prompt"}\n')
        return str(path), "line 3 has neither text nor prompt/response"
    if name == "not an object":
        path.write_text('["text", "a list"]\n')
        return str(path), "line 1 has neither text nor prompt/response"
    if name == "empty":
        path.write_text("")
        return str(path), "has no examples"
    if name == "only blank lines":
        path.write_text("\n  \n")
        return str(path), "has no examples"
    if name == "unknown role":
        write_jsonl(path, [chat("Q", "A"), {"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}])
        return str(path), "d.jsonl line 2: message 2 has role 'bot', not one of system, user, assistant, tool"
    if name == "no assistant turn":
        write_jsonl(path, [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]}])
        return str(path), "d.jsonl line 1: the conversation has no assistant turn"
    if name == "messages not a list":
        write_jsonl(path, [{"messages": "hello"}])
        return str(path), "d.jsonl line 1: messages is text but not JSON"
    if name == "message without content":
        write_jsonl(path, [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}])
        return str(path), "d.jsonl line 1: message 2 is not a {role, content} object"
    return "no-such-set", "arithmetic, python-reference"


@pytest.mark.parametrize(
    "name",
    ["missing", "not json", "neither shape", "not an object", "empty", "only blank lines", "unknown role",
     "no assistant turn", "messages not a list", "message without content", "unknown name"],
)
def test_bad_data_is_one_line_with_exit_status_2(tmp_path, name):
    spec, expected = bad_input(tmp_path, name)
    with pytest.raises(QraError) as caught:
        load_dataset(spec)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_bad_held_out_file_is_named(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered(3))
    with pytest.raises(QraError, match="held.jsonl not found"):
        load_dataset(str(train), held_out=str(tmp_path / "held.jsonl"))


# --- chat messages ---------------------------------------------------------------------------------------------


def chat(*turns: str, system: str | None = None) -> dict:
    """A `messages` record: a system prompt where given, then user and assistant turns in alternation."""
    roles = ["user", "assistant"] * len(turns)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": content} for role, content in zip(roles, turns)
    ]
    return {"messages": messages}


def conversation(*turns: str, system: str | None = None) -> Conversation:
    return Conversation(tuple(Message(m["role"], m["content"]) for m in chat(*turns, system=system)["messages"]))


def test_messages_lines_are_conversations_beside_text_and_prompt_response(tmp_path):
    records = [chat("What is 2 + 2?", "4", system="Answer with a number."), {"text": "x = 1"}, {"prompt": "Q", "response": "A"}]
    data = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", records)), held_out_fraction=0)
    assert data.train == [conversation("What is 2 + 2?", "4", system="Answer with a number."), Example("", "x = 1"), Example("Q", "A")]
    assert data.train[0].origin == f"{tmp_path / 'd.jsonl'} line 1"


def test_a_tool_turn_is_a_message_like_any_other(tmp_path):
    turns = [("user", "time?"), ("tool", "12:00"), ("assistant", "noon")]
    record = {"messages": [{"role": role, "content": content} for role, content in turns]}
    [loaded] = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", [record])), held_out_fraction=0).train
    assert [message.role for message in loaded.messages] == ["user", "tool", "assistant"]


def assistant_text(tokenizer, feature) -> list[str]:
    """The text of each run of consecutive labelled tokens of a feature."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def test_the_loss_falls_on_every_assistant_turn_and_its_end_of_turn_token_only():
    tokenizer = tiny_chat_tokenizer()
    chatted = conversation("What is 2 + 2?", "4", "And 3 + 3?", "It is 6.", system="Answer briefly.")
    [feature] = tokenize_conversations([chatted], tokenizer, seq_len=256)
    rendered = tokenizer.apply_chat_template([vars(message) for message in chatted.messages])["input_ids"]
    assert feature["input_ids"] == rendered
    assert assistant_text(tokenizer, feature) == ["4<|endoftext|>", "It is 6.<|endoftext|>"]
    assert feature["attention_mask"] == [1] * len(rendered)


def test_a_conversation_longer_than_seq_len_is_cut_after_its_last_assistant_turn_that_fits_and_the_cuts_are_logged(caplog):
    tokenizer = tiny_chat_tokenizer()
    long = conversation("What is 2 + 2?", "4", "Then say something long.", "word " * 200)
    [whole_first_turn] = tokenize_conversations([conversation("What is 2 + 2?", "4")], tokenizer, seq_len=256)
    with caplog.at_level(logging.WARNING, logger="qra.runtime.data"):
        [cut] = tokenize_conversations([long], tokenizer, seq_len=64)
    assert cut["input_ids"] == whole_first_turn["input_ids"]
    assert assistant_text(tokenizer, cut) == ["4<|endoftext|>"]
    assert "1 of 1 conversations are longer than 64 tokens: 1 cut after their last assistant turn that fits" in caplog.text


def test_a_first_assistant_turn_longer_than_seq_len_is_cut_inside_it_and_one_with_no_assistant_token_left_is_dropped(caplog):
    tokenizer = tiny_chat_tokenizer()
    with caplog.at_level(logging.WARNING, logger="qra.runtime.data"):
        features = tokenize_conversations([conversation("Q", "word " * 100), conversation("word " * 100, "A")], tokenizer, seq_len=32)
    [inside] = features
    assert len(inside["input_ids"]) == 32 and inside["labels"][-1] != IGNORE_INDEX
    assert "2 of 2 conversations are longer than 32 tokens: 0 cut after" in caplog.text
    assert "1 cut inside their first assistant turn, 1 dropped" in caplog.text


def test_conversations_follow_the_packed_text_and_the_prompt_response_pairs_and_pad_their_batches():
    tokenizer = tiny_chat_tokenizer()
    text, pair, chatted = Example("", "x = 1 " * 40), Example("Q", " A"), conversation("Q", "A")
    features = training_features([chatted, pair, text], tokenizer, seq_len=32)
    packed, pairs = pack_text([text], tokenizer, 32), tokenize_examples([pair], tokenizer, 32)
    assert features == packed + pairs + tokenize_conversations([chatted], tokenizer, 32)
    from qra.runtime.data import Dataset

    assert pads(Dataset("chat", [chatted], []), batch_size=4)
    assert training_for(Training(batch_size=4), Dataset("chat", [chatted], [])).padded_batches


def test_a_tokenizer_without_a_chat_template_refuses_conversations_in_one_line():
    with pytest.raises(QraError, match="the model's tokenizer has no chat template") as caught:
        tokenize_conversations([conversation("Q", "A")], tiny_tokenizer(), seq_len=32)
    assert "\n" not in str(caught.value)


def test_a_template_that_fails_on_a_conversation_names_its_line():
    tokenizer = tiny_chat_tokenizer()
    refusal = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    tokenizer.chat_template = refusal + tokenizer.chat_template
    chatted = Conversation(conversation("Q", "A", system="S").messages, "d.jsonl line 7")
    with pytest.raises(QraError, match="d.jsonl line 7: the model's chat template cannot render this conversation: no system role"):
        tokenize_conversations([chatted], tokenizer, seq_len=32)


# --- Parquet, CSV, JSON and saved data sets ----------------------------------------------------------------------


RECORDS = [chat("What is 2 + 2?", "4", system="Answer with a number."), chat("Hi", "Hello", "2 * 3?", "6"), chat("Bye", "Bye")]


def saved(tmp_path: Path, records: list[dict], kind: str) -> Path:
    """`records` written the way `datasets` writes each format (CSV keeps the messages as JSON text)."""
    import datasets

    if kind == "csv":
        records = [{key: json.dumps(value) if key == "messages" else value for key, value in record.items()} for record in records]
    table = datasets.Dataset.from_list(records)
    path = tmp_path / f"d.{kind}" if kind != "folder" else tmp_path / "saved"
    {"parquet": table.to_parquet, "csv": lambda p: table.to_csv(p, index=False), "json": table.to_json,
     "folder": table.save_to_disk}[kind](str(path))
    return path


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "folder"])
def test_parquet_csv_json_and_saved_folders_hold_the_same_records_as_jsonl(tmp_path, kind):
    jsonl = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", RECORDS)), held_out_fraction=0).train
    assert load_dataset(str(saved(tmp_path, RECORDS, kind)), held_out_fraction=0).train == jsonl


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "folder"])
def test_text_and_prompt_response_columns_are_found_by_name_in_every_format(tmp_path, kind):
    records = [{"text": "x = 1", "prompt": None, "response": None}, {"text": None, "prompt": "Q", "response": " A"}]
    if kind == "csv":
        records = [{"text": "x = 1"}, {"text": "y = 2"}]
    expected = [Example("", "x = 1"), Example("Q", " A")] if kind != "csv" else [Example("", "x = 1"), Example("", "y = 2")]
    assert load_dataset(str(saved(tmp_path, records, kind)), held_out_fraction=0).train == expected


def test_text_and_messages_fields_of_other_names_are_named_by_fields(tmp_path):
    records = [{"body": "x = 1", "dialogue": None}, {"body": None, "dialogue": chat("Q", "A")["messages"]}]
    path = str(saved(tmp_path, records, "parquet"))
    data = load_dataset(path, held_out_fraction=0, fields=Fields(text="body", messages="dialogue"))
    assert data.train == [Example("", "x = 1"), conversation("Q", "A")]
    with pytest.raises(QraError, match="row 1 has neither text nor prompt/response"):
        load_dataset(path)


def test_a_saved_dataset_dict_holds_out_its_test_split(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:2]), "test": datasets.Dataset.from_list(RECORDS[2:])})
    splits.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset(str(tmp_path / "saved"))
    assert data.train == [conversation("What is 2 + 2?", "4", system="Answer with a number."), conversation("Hi", "Hello", "2 * 3?", "6")]
    assert data.held_out == [conversation("Bye", "Bye")]


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "folder"])
def test_a_held_out_set_of_any_format_replaces_the_split(tmp_path, kind):
    train = write_jsonl(tmp_path / "train.jsonl", numbered(10))
    held = saved(tmp_path, RECORDS[2:], kind)
    data = load_dataset(str(train), held_out=str(held))
    assert len(data.train) == 10 and data.held_out == [conversation("Bye", "Bye")]
    assert load_dataset("arithmetic", held_out=str(held)).held_out == [conversation("Bye", "Bye")]


def test_a_row_of_neither_shape_is_named_by_file_and_row(tmp_path):
    path = saved(tmp_path, [*RECORDS, {"messages": None, "title": "neither"}], "parquet")
    with pytest.raises(QraError, match=re.escape(f"{path} row 4 has neither text nor prompt/response")):
        load_dataset(str(path))


def test_a_role_outside_system_user_assistant_tool_is_named_by_file_and_row(tmp_path):
    bad = {"messages": [{"role": "user", "content": "Q"}, {"role": "developer", "content": "A"}]}
    path = saved(tmp_path, [RECORDS[0], bad], "parquet")
    with pytest.raises(QraError, match=re.escape(f"{path} row 2: message 2 has role 'developer'")):
        load_dataset(str(path))


def test_a_conversation_without_an_assistant_turn_is_named_by_file_and_row(tmp_path):
    path = saved(tmp_path, [RECORDS[0], {"messages": [{"role": "user", "content": "Q"}]}], "csv")
    with pytest.raises(QraError, match=re.escape(f"{path} row 2: the conversation has no assistant turn")):
        load_dataset(str(path))


@pytest.mark.parametrize("kind", ["parquet", "csv", "json"])
def test_an_empty_file_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    path.write_text("")
    with pytest.raises(QraError, match=re.escape(f"{path} has no examples")):
        load_dataset(str(path))


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_file_of_no_rows_is_refused_in_one_line(tmp_path, kind):
    import datasets

    path = tmp_path / f"d.{kind}"
    if kind == "parquet":
        datasets.Dataset.from_dict({"text": []}).to_parquet(str(path))
    else:
        path.write_text("text\n")
    with pytest.raises(QraError, match=re.escape(f"{path} has no examples")):
        load_dataset(str(path))


def test_an_unreadable_parquet_file_is_refused_in_one_line_that_says_why(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not a Parquet file")
    with pytest.raises(QraError) as caught:
        load_dataset(str(path))
    assert str(caught.value).startswith(f"data file {path} cannot be read as Parquet: ")
    assert "\n" not in str(caught.value) and caught.value.exit_code == 2


def test_a_folder_that_is_not_a_saved_data_set_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(QraError, match="is not a data set saved by datasets.save_to_disk"):
        load_dataset(str(tmp_path / "notes"))


# --- bundled sets ----------------------------------------------------------------------------------------------


def test_python_reference_holds_out_every_fifth_topic_by_name():
    data = load_dataset("python-reference")
    topics = sorted(pydoc_data.topics.topics.items())
    assert [example.response for example in data.held_out] == [text for _, text in topics[4::5]]
    assert len(data.train) + len(data.held_out) == len(topics)
    assert not {example.response for example in data.held_out} & {example.response for example in data.train}
    assert all(example.is_text for example in data.train + data.held_out)
    assert python_reference() == data


QUESTION = re.compile(r"Q: What is (\d+) ([-+*]) (\d+)\?\nA:|Q: How many (\w+) are in (\d+) (\w+)\?\nA:")
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
FACTORS = {("centimeters", "meters"): 100, ("meters", "kilometers"): 1000, ("grams", "kilograms"): 1000,
           ("milliliters", "liters"): 1000, ("minutes", "hours"): 60, ("seconds", "minutes"): 60}


def expected_answer(prompt: str) -> int:
    """The answer worked out from the question itself."""
    match = QUESTION.fullmatch(prompt)
    assert match, prompt
    a, sign, b, small, amount, large = match.groups()
    if sign:
        return OPERATORS[sign](int(a), int(b))
    return int(amount) * FACTORS[small, large]


def test_arithmetic_answers_are_exact():
    data = arithmetic(seed=3)
    for example in data.train + data.held_out:
        assert example.response == f" {expected_answer(example.prompt)}"


def test_arithmetic_mixes_operations_and_conversions():
    prompts = " ".join(example.prompt for example in arithmetic().train)
    for marker in (" + ", " - ", " * ", "How many"):
        assert marker in prompts


def test_the_arithmetic_training_questions_do_not_depend_on_how_many_are_held_out():
    assert arithmetic(seed=2, held_out_size=50).train == arithmetic(seed=2).train


def test_arithmetic_is_seeded_sized_and_disjoint():
    data = load_dataset("arithmetic", seed=5)
    assert (len(data.train), len(data.held_out)) == (2000, 600)
    assert not {example.prompt for example in data.held_out} & {example.prompt for example in data.train}
    assert len({example.prompt for example in data.train}) == 2000
    assert load_dataset("arithmetic", seed=5) == data
    assert load_dataset("arithmetic", seed=6).train != data.train
    assert len(arithmetic(train_size=10, held_out_size=4).held_out) == 4


def test_bundled_sets_joined_by_plus_concatenate_their_train_and_held_out_sets():
    joined = load_dataset("python-reference+arithmetic", seed=3)
    reference, questions = python_reference(), arithmetic(seed=3)
    assert joined.name == "python-reference+arithmetic"
    assert joined.train == reference.train + questions.train
    assert joined.held_out == reference.held_out + questions.held_out


def test_a_joined_set_keeps_each_tasks_held_out_examples_apart():
    joined = load_dataset("python-reference+arithmetic", seed=3)
    assert joined.held_out_by_task() == {"python-reference": python_reference().held_out, "arithmetic": arithmetic(seed=3).held_out}
    assert load_dataset("arithmetic").held_out_by_task() == {"arithmetic": arithmetic().held_out}


def test_a_separate_held_out_file_is_one_task_even_for_a_joined_set(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text('{"prompt": "Q", "response": "A"}\n')
    joined = load_dataset("python-reference+arithmetic", held_out=str(path))
    assert joined.held_out_by_task() == {"python-reference+arithmetic": [Example("Q", "A")]}


def test_a_joined_set_names_the_part_it_cannot_find(tmp_path):
    with pytest.raises(QraError, match="unknown data 'nonsense'"):
        load_dataset("arithmetic+nonsense")


# --- tokenization --------------------------------------------------------------------------------------------


def test_loss_falls_only_on_response_tokens_and_eos(tokenizer):
    example = Example("Q: What is 2 + 3?\nA:", " 5")
    [feature] = tokenize_examples([example], tokenizer, seq_len=64)
    prompt = tokenizer(example.prompt)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert feature["input_ids"] == prompt + response + [eos]
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + response + [eos]
    assert feature["attention_mask"] == [1] * len(feature["input_ids"])


def test_plain_text_is_learned_whole(tokenizer):
    [feature] = tokenize_examples([Example("", "for x in y: pass")], tokenizer, seq_len=64)
    assert feature["labels"] == feature["input_ids"]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id


def test_long_examples_are_cut_to_seq_len_and_fully_prompted_ones_dropped(tokenizer):
    text = pydoc_data.topics.topics["assert"]
    features = tokenize_examples([Example("", text), Example(text, " yes")], tokenizer, seq_len=16)
    assert len(features) == 1
    assert len(features[0]["input_ids"]) == len(features[0]["labels"]) == 16


def test_packing_yields_full_blocks_of_text_separated_by_eos(tokenizer):
    data = python_reference()
    features = pack_text(data.train[:5], tokenizer, seq_len=32)
    assert features and all(len(feature["input_ids"]) == 32 for feature in features)
    assert all(feature["labels"] == feature["input_ids"] for feature in features)
    assert all(feature["attention_mask"] == [1] * 32 for feature in features)
    stream = [token for feature in features for token in feature["input_ids"]]
    assert tokenizer.eos_token_id in stream


def test_a_mixed_set_packs_its_text_and_keeps_one_sequence_per_question(tokenizer):
    text = python_reference().train[:3]
    questions = arithmetic(train_size=5, held_out_size=0).train
    features = training_features(text + questions, tokenizer, seq_len=32)
    assert features == pack_text(text, tokenizer, 32) + tokenize_examples(questions, tokenizer, 32)


def test_packing_refuses_prompt_response_examples(tokenizer):
    with pytest.raises(ValueError):
        pack_text([Example("Q", "A")], tokenizer, seq_len=8)


# --- batches -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features(tokenizer):
    return tokenize_examples(arithmetic(train_size=40, held_out_size=0).train, tokenizer, seq_len=64)


def test_batches_are_fixed_by_seed_and_epoch(tokenizer, features):
    def run(seed: int, epoch: int) -> list[list[list[int]]]:
        return [batch["input_ids"].tolist() for batch in batches(features, 8, seed, epoch, pad_id(tokenizer))]

    assert run(0, 0) == run(0, 0)
    assert run(0, 1) == run(0, 1)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)


def test_an_epoch_covers_every_feature_once(tokenizer, features):
    epoch = batches(features, 7, seed=0, epoch=2, pad=pad_id(tokenizer))
    assert [len(batch["input_ids"]) for batch in epoch] == [7] * 5 + [5]
    rows = [(row, mask) for batch in epoch for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    seen = sorted(tuple(row[mask.bool()].tolist()) for row, mask in rows)
    assert seen == sorted(tuple(feature["input_ids"]) for feature in features)


def test_padding_is_masked_and_learns_nothing(tokenizer, features):
    pad = pad_id(tokenizer)
    epoch = batches(features, 8, seed=0, epoch=0, pad=pad)
    assert any((batch["attention_mask"] == 0).any() for batch in epoch)
    for batch in epoch:
        assert all(tensor.dtype == torch.long for tensor in batch.values())
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == IGNORE_INDEX).all()
        assert (batch["input_ids"][padding] == pad).all()


# --- evaluation ------------------------------------------------------------------------------------------------


def test_exact_match_compares_the_first_line_stripped():
    examples = [Example("Q: What is 1 + 1?\nA:", " 2"), Example("Q: What is 2 + 2?\nA:", " 4")]
    answers = {examples[0].prompt: " 2\nQ: What is 5 + 5?", examples[1].prompt: " 5"}
    assert exact_match(answers.__getitem__, examples) == 0.5
    assert exact_match(lambda prompt: "2 \n", examples[:1]) == 1.0


def test_batches_pad_where_the_data_has_prompt_response_examples_and_a_batch_holds_several_sequences():
    assert not pads(python_reference(), batch_size=4)  # packed into full blocks
    assert pads(arithmetic(), batch_size=4)
    assert pads(load_dataset("python-reference+arithmetic"), batch_size=4)
    assert not pads(arithmetic(), batch_size=1)
    assert training_for(Training(batch_size=4), arithmetic()).padded_batches
    assert not training_for(Training(batch_size=4), python_reference()).padded_batches


def test_a_batch_extent_covers_another_with_no_more_tokens_and_no_padding_it_lacks():
    tokenizer = tiny_tokenizer()
    features = training_features(load_dataset("python-reference+arithmetic").train[-40:], tokenizer, 32)
    epoch = batches(features, 4, seed=0, epoch=0, pad=pad_id(tokenizer))
    extents = {BatchExtent.of(batch) for batch in epoch}
    assert any(extent.padded for extent in extents)
    worst = BatchExtent.of(worst_batch(epoch))
    assert all(worst.covers(extent) for extent in extents)
    full_padded = BatchExtent(tokens=128, padded=True)
    assert all(full_padded.covers(extent) for extent in extents if extent.tokens <= 128)
    assert not BatchExtent(tokens=128, padded=False).covers(full_padded)
    assert not BatchExtent(tokens=64, padded=True).covers(BatchExtent(tokens=128, padded=False))
