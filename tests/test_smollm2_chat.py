"""Chat data on the real default model (SmolLM2-135M-Instruct), whose chat template has system, user and
assistant turns: the loss falls on each assistant turn's tokens and its end-of-turn token `<|im_end|>`, and a
materialize run on the shipped chat example reports its held-out loss on exactly those tokens.

Slow (loads the GGUF's tokenizer, ~7 s; the materialize run quantizes and trains the 135M model, minutes):
run with `pytest -m slow`.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qra.cli import app
from qra.models import load_tokenizer, resolve_model
from qra.runtime.data import IGNORE_INDEX, Conversation, Message, load_dataset, tokenize_conversations

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m"))


def conversation(*messages: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in messages))


def labelled_runs(feature) -> list[list[int]]:
    """The runs of consecutive tokens that carry a label (each label the token itself)."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("system", ["You answer with a number.", None], ids=["own system prompt", "template's default"])
def test_smollm2_learns_each_assistant_turn_and_its_end_of_turn_token_and_nothing_else(tokenizer, system):
    turns = [("user", "What is 12 * 3?"), ("assistant", "36"), ("user", "And 36 - 30?"), ("assistant", "It is 6.")]
    chatted = conversation(*([("system", system)] if system else []), *turns)
    [feature] = tokenize_conversations([chatted], tokenizer, seq_len=512)
    assert feature["input_ids"] == tokenizer.apply_chat_template([vars(m) for m in chatted.messages])["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labelled_runs(feature) == [tokenizer("36", add_special_tokens=False)["input_ids"] + [end_of_turn],
                                      tokenizer("It is 6.", add_special_tokens=False)["input_ids"] + [end_of_turn]]
    assert [tokenizer.decode(run) for run in labelled_runs(feature)] == ["36<|im_end|>", "It is 6.<|im_end|>"]
    unlabelled = tokenizer.decode([token for token, label in zip(feature["input_ids"], feature["labels"]) if label == IGNORE_INDEX])
    assert (system or "You are a helpful AI assistant named SmolLM") in unlabelled and "What is 12 * 3?" in unlabelled
    assert unlabelled.count("<|im_start|>assistant\n") == 2  # the generation prompt is context, not learned


def test_smollm2_materialize_on_chat_messages_reports_the_held_out_loss_of_the_assistant_tokens(tokenizer, tmp_path):
    data, held_out = EXAMPLES / "arithmetic-chat.jsonl", EXAMPLES / "arithmetic-chat-held-out.jsonl"
    runner = CliRunner()
    plan = tmp_path / "plan.yaml"
    made = runner.invoke(app, ["plan", "new", "--model", "smollm2-135m", "--bits", "4", "--rank", "8", "--budget", "3GB",
                               "--seq-len", "128", "--batch-size", "4", "--steps", "5", "--learning-rate", "1e-3",
                               "--data", str(data), "-o", str(plan)])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["materialize", str(plan), "-o", str(tmp_path / "run"), "--data", str(data), "--held-out", str(held_out)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    contents = [m.content for c in load_dataset(str(held_out), held_out_fraction=0).train for m in c.messages if m.role == "assistant"]
    [score] = results["held_out_scores"]["by_task"].values()
    assert score["tokens"] == sum(len(tokenizer(content, add_special_tokens=False)["input_ids"]) + 1 for content in contents)
    assert score["sequences"] == 63
    training = results["training"]
    assert training["held_out_loss_after"] < training["held_out_loss_before"]
    assert results["memory"]["within_budget"]
