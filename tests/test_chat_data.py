"""Data as people keep it, through the commands: chat conversations, Parquet files and a held-out set of one's
own compile, verify and materialize on a tiny Llama whose tokenizer has a chat template; the held-out loss is
the assistant turns'; and every bad input is refused in one line, naming the file and row, before anything is
quantized or written."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from tiny import save_tiny_model, tiny_spec
from tiny_chat import save_tiny_chat_model, tiny_chat_tokenizer
from typer.testing import CliRunner

from qra.cli import app
from qra.compiler.compile import CompileRequest, Effort, budget_bounds, journal_key, prepare
from qra.compiler.space import build_space
from qra.plans.io import load_plan
from qra.plans.schema import Budget, Device, Training
from qra.runtime.data import load_dataset

EXAMPLES = Path(__file__).parents[1] / "examples"
CHAT = EXAMPLES / "arithmetic-chat.jsonl"
CHAT_HELD_OUT = EXAMPLES / "arithmetic-chat-held-out.jsonl"
SEQ_LEN = 112  # in the tiny tokenizer's tokens: the longer example conversations are cut, no one-question one
CPU = ("--device", "cpu", "--context", "0")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat") / "model", "llama", layers=2)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("plain") / "model", "llama", layers=2)


def one_question_parquet(jsonl: Path, folder: Path) -> Path:
    """The conversations of `jsonl` that ask one question (system, user, assistant), as a Parquet file."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    path = folder / f"{jsonl.stem}.parquet"
    datasets.Dataset.from_list([record for record in records if len(record["messages"]) == 3]).to_parquet(str(path))
    return path


def run(*args) -> object:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def budget(layers: int = 2) -> str:
    training = Training(seq_len=SEQ_LEN, batch_size=2, padded_batches=True)
    low, high = budget_bounds(build_space(tiny_spec("llama", layers), (2, 4, 8), (4, 16), training, Device(kind="cpu", context_bytes=0)))
    return str((low + high) // 2)


def assistant_tokens(path: Path) -> int:
    """The tokens the loss falls on in a file of conversations: each assistant turn's content and its
    end-of-turn token (the tiny template's `<|endoftext|>`)."""
    tokenizer = tiny_chat_tokenizer()
    contents = [message.content for conversation in load_dataset(str(path), held_out_fraction=0).train
                for message in conversation.messages if message.role == "assistant"]
    return sum(len(tokenizer(content, add_special_tokens=False)["input_ids"]) + 1 for content in contents)


# --- end to end ---------------------------------------------------------------------------------------------------


def test_the_shipped_chat_example_is_what_its_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "arithmetic_chat.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in (CHAT.name, CHAT_HELD_OUT.name):
        assert (tmp_path / name).read_text() == (EXAMPLES / name).read_text()
    train, held = load_dataset(str(CHAT), held_out=str(CHAT_HELD_OUT)).train, load_dataset(str(CHAT_HELD_OUT), held_out_fraction=0).train
    assert len(train) > 250 and len(held) > 50
    assert all([m.role for m in c.messages][:3] == ["system", "user", "assistant"] for c in train + held)
    assert any(len(c.messages) > 3 for c in train)  # multi-turn conversations


def test_a_compile_on_chat_messages_with_a_parquet_held_out_set_verifies_on_its_data_and_materializes(chat_model, tmp_path):
    held_out = one_question_parquet(CHAT_HELD_OUT, tmp_path)
    plan_path = tmp_path / "plan.yaml"
    compiled = run("compile", "--model", chat_model, "--budget", budget(), "-o", plan_path, "--data", CHAT, "--held-out", held_out,
                   "--bits", "2,4,8", "--ranks", "4,16", "--seq-len", SEQ_LEN, "--batch-size", "2", "--steps", "4",
                   "--learning-rate", "5e-3", *CPU)
    assert compiled.exit_code == 0, compiled.output
    plan = load_plan(plan_path)
    assert plan.training.padded_batches  # conversations pad their batches, like prompt/response
    assert f"data {CHAT}, held-out {held_out}" in plan.provenance.note
    verified = run("plan", "verify", plan_path, "--data", CHAT)
    assert verified.exit_code == 0 and verified.stdout.startswith("verified:"), verified.output
    materialized = run("materialize", plan_path, "-o", tmp_path / "run", "--data", CHAT, "--held-out", held_out)
    assert materialized.exit_code == 0, materialized.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["held_out_data"] == str(held_out) and results["exact_match"] is None
    [score] = results["held_out_scores"]["by_task"].values()
    assert score["tokens"] == assistant_tokens(held_out)  # the held-out loss is the assistant turns' alone
    assert score["sequences"] == len(load_dataset(str(held_out), held_out_fraction=0).train)
    assert results["training"]["held_out_loss_after"] < results["training"]["held_out_loss_before"]


def test_a_changed_held_out_set_keys_another_journal_and_no_held_out_set_keys_none(chat_model, tmp_path):
    held_out = tmp_path / "held.jsonl"
    held_out.write_text(CHAT_HELD_OUT.read_text())
    request = CompileRequest(
        model=str(chat_model), budget=Budget(bytes=int(budget()), text="middle"), data=str(CHAT), held_out=str(held_out),
        bits=(2, 4, 8), ranks=(4, 16), effort=Effort(2, (0, 1), None, prior_probe_steps=1, prior_sequences=2),
        training=Training(seq_len=SEQ_LEN, batch_size=2, steps=2), device=Device(kind="cpu", context_bytes=0),
        work=tmp_path / "work", strategy="uniform",
    )
    prepared = prepare(request)
    key = journal_key(request, prepared, "uniform")
    held_out.write_text("".join(CHAT_HELD_OUT.read_text().splitlines(keepends=True)[:-1]))
    assert journal_key(request, prepared, "uniform") != key
    without = replace(request, held_out=None)
    assert journal_key(without, prepared, "uniform") not in (key, journal_key(request, prepared, "uniform"))


# --- bad input: one line, file and row, nothing written ------------------------------------------------------------


def bad_data(folder: Path, case: str) -> tuple[list[str], str]:
    """The --data / --held-out options of a bad input, and what its one line must say."""
    good = [{"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}] * 3
    if case == "a row of neither shape":
        path = folder / "d.parquet"
        datasets.Dataset.from_list([*good, {"messages": None}]).to_parquet(str(path))
        return ["--data", str(path)], f"{path} row 4 has neither text nor prompt/response"
    if case == "a role outside system, user, assistant, tool":
        path = folder / "d.jsonl"
        bad = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "robot", "content": "4"}]}
        path.write_text("".join(json.dumps(record) + "\n" for record in [*good, bad]))
        return ["--data", str(path)], f"{path} line 4: message 2 has role 'robot'"
    if case == "a conversation with no assistant turn":
        path = folder / "d.csv"
        lonely = [{"role": "user", "content": "hi"}]
        rows = [{"messages": json.dumps(messages)} for messages in [*(record["messages"] for record in good), lonely]]
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
        return ["--data", str(path)], f"{path} row 4: the conversation has no assistant turn"
    if case == "an empty file":
        path = folder / "d.parquet"
        path.write_bytes(b"")
        return ["--data", str(path)], f"{path} has no examples"
    if case == "an unreadable Parquet file":
        path = folder / "d.parquet"
        path.write_bytes(b"PAR1 not really")
        return ["--data", str(path)], f"data file {path} cannot be read as Parquet: "
    path = folder / "held.jsonl"
    path.write_text('{"messages": []}\n')
    return ["--data", "arithmetic", "--held-out", str(path)], f"{path} line 1: messages is not a non-empty list"


CASES = ["a row of neither shape", "a role outside system, user, assistant, tool", "a conversation with no assistant turn",
         "an empty file", "an unreadable Parquet file", "a bad held-out file"]


def assert_one_line(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize("case", CASES)
def test_materialize_refuses_bad_data_in_one_line_before_writing_anything(chat_model, tmp_path, case):
    options, expected = bad_data(tmp_path, case)
    run("plan", "new", "--model", chat_model, "--budget", "2GB", "-o", tmp_path / "plan.yaml")
    result = run("materialize", tmp_path / "plan.yaml", "-o", tmp_path / "run", *options)
    assert_one_line(result, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", CASES)
def test_compile_and_estimate_refuse_bad_data_in_one_line(chat_model, tmp_path, case):
    options, expected = bad_data(tmp_path, case)
    result = run("compile", "--model", chat_model, "--budget", "2GB", "-o", tmp_path / "plan.yaml", *options, *CPU)
    assert_one_line(result, expected)
    assert list(tmp_path.glob("plan.yaml*")) == []
    assert_one_line(run("estimate", "--model", chat_model, "--bits", "4", "--rank", "8", *options), expected)


def test_messages_for_a_model_without_a_chat_template_are_refused_in_one_line_before_writing_anything(plain_model, tmp_path):
    run("plan", "new", "--model", plain_model, "--budget", "2GB", "-o", tmp_path / "plan.yaml")
    expected = "the model's tokenizer has no chat template"
    assert_one_line(run("materialize", tmp_path / "plan.yaml", "-o", tmp_path / "run", "--data", CHAT), expected)
    assert not (tmp_path / "run").exists()
    compiled = run("compile", "--model", plain_model, "--budget", "2GB", "-o", tmp_path / "c.yaml", "--data", CHAT, *CPU)
    assert_one_line(compiled, expected)
    assert list(tmp_path.glob("c.yaml*")) == []


def test_held_out_without_data_and_a_field_named_twice_are_refused_in_one_line(chat_model):
    estimate = ("estimate", "--model", chat_model, "--bits", "4", "--rank", "8")
    assert_one_line(run(*estimate, "--held-out", CHAT_HELD_OUT), "--held-out goes with --data")
    assert_one_line(run(*estimate, "--data", CHAT, "--text-field", "messages"),
                    "--text-field and --messages-field must be two different names")
