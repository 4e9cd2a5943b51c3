"""`qra materialize`: a mixed-bit plan on a tiny Llama is quantized, trained and packaged, and bad
input is refused before any heavy work."""

import json

import pytest
from typer.testing import CliRunner

from qra.cli import app
from qra.models import content_hash, resolve_model
from qra.plans.build import model_ref, uniform_plan, with_memory
from qra.plans.io import save_plan
from qra.plans.schema import Budget, Device, Training
from qra.runtime.materialize import MaterializeRequest, materialize
from qra.testing import save_tiny_model, tiny_spec

LAYER_BITS = [2, 3, 4, 8]
LAYER_RANKS = [16, 8, 8, 4]


def mixed_plan(folder, family="llama", **training):
    spec = tiny_spec(family, layers=4)
    source = resolve_model(str(folder))
    settings = dict(steps=8, batch_size=2, seq_len=48, learning_rate=5e-3) | training
    plan = uniform_plan(
        spec, model_ref(spec, str(folder), content_hash(source)), Budget(bytes=2 * 10**9, text="2GB"), 4, 8,
        group_size=32, training=Training(**settings), device=Device(kind="cpu", context_bytes=0),
    )
    layers = [layer.model_copy(update={"bits": b, "rank": r, "alpha": 2.0 * r}) for layer, b, r in zip(plan.layers, LAYER_BITS, LAYER_RANKS)]
    return with_memory(plan.model_copy(update={"layers": layers}), spec)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama", layers=4)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_qwen2_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2") / "model", "qwen2", layers=4)


def test_materialize_quantizes_trains_and_packages_a_mixed_plan(tiny_folder, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    save_plan(mixed_plan(tiny_folder), plan_path)
    result = run("materialize", plan_path, "-o", tmp_path / "run", "--data", "python-reference")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    training = results["training"]
    assert training["held_out_loss_after"] < training["held_out_loss_before"]
    memory = results["memory"]
    assert memory["measured"]["saved_weight_like_bytes"] == 0
    assert abs(memory["persistent_error"]) < 0.05
    adapter_config = json.loads((tmp_path / "run" / "work" / "adapter" / "adapter_config.json").read_text())
    ranks = {key.replace("\\", ""): rank for key, rank in adapter_config["rank_pattern"].items()}
    assert ranks["model.layers.0.mlp.down_proj"] == 16 and ranks["model.layers.3.self_attn.q_proj"] == 4


def bad_run(tmp_path, plan, *extra, data="python-reference"):
    plan_path = tmp_path / "plan.yaml"
    save_plan(plan, plan_path)
    return run("materialize", plan_path, "-o", tmp_path / "out", "--data", data, *extra)


def assert_refused(result):
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_unknown_format_is_refused(tiny_folder, tmp_path):
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder), "--format", "adapter,tflite"))
    assert not (tmp_path / "out").exists()


def test_output_folder_of_something_else_is_refused(tiny_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder)))


def test_plan_for_another_model_is_refused(tiny_folder, tmp_path):
    other = save_tiny_model(tmp_path / "qwen", "qwen2", layers=4)
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder), "--model", other))


def test_empty_and_unreadable_data_are_refused(tiny_folder, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder), data=empty))
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder), data=tmp_path / "missing.jsonl"))


def test_sequence_length_above_the_model_limit_is_refused(tiny_folder, tmp_path):
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder, seq_len=4096)))


def test_materialize_on_qwen2_with_answers_reports_exact_match_and_writes_every_format(tiny_qwen2_folder, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    spec_plan = mixed_plan(tiny_qwen2_folder, "qwen2", steps=4)
    save_plan(spec_plan, plan_path)
    result = run("materialize", plan_path, "-o", tmp_path / "run", "--data", "arithmetic", "--format", "adapter,merged,gptq,onnx,gguf")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["exact_match"] <= 1.0
    for name in ("adapter", "merged", "gptq", "onnx", "gguf"):
        manifest = json.loads((tmp_path / "run" / name / "manifest.json").read_text())
        assert manifest["plan_fingerprint"] == spec_plan.model.fingerprint


def test_rerunning_with_resume_reuses_the_run_folder(tiny_folder, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    save_plan(mixed_plan(tiny_folder, steps=4), plan_path)
    assert run("materialize", plan_path, "-o", tmp_path / "run").exit_code == 0
    again = run("materialize", plan_path, "-o", tmp_path / "run", "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["training"]["resumed_from"] == 4


def test_check_accepts_a_matching_plan_and_writes_nothing(tiny_folder, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    save_plan(mixed_plan(tiny_folder), plan_path)
    result = run("materialize", plan_path, "-o", tmp_path / "run", "--check")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"accepted: {plan_path} matches {tiny_folder}")
    assert not (tmp_path / "run").exists()


def test_check_refuses_a_plan_for_another_model(tiny_folder, tmp_path):
    other = save_tiny_model(tmp_path / "qwen", "qwen2", layers=4)
    assert_refused(bad_run(tmp_path, mixed_plan(tiny_folder), "--model", other, "--check"))
    assert not (tmp_path / "out").exists()


def test_joined_data_reports_each_tasks_held_out_loss_their_mean_as_headline_and_seeds_share_one_quantization_and_held_out_set(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    plan = mixed_plan(tiny_folder, steps=2)
    results = []
    for seed in (0, 1):
        seeded = plan.model_copy(update={"training": plan.training.model_copy(update={"seed": seed})})
        request = MaterializeRequest(plan=seeded, output=tmp_path / f"seed{seed}", data="python-reference+arithmetic",
                                     cache=cache, exact_match_examples=3, data_seed=0)
        results.append(materialize(request))
    assert set(results[0]["held_out_by_task"]) == {"python-reference", "arithmetic"}
    assert results[0]["held_out_by_task"] != results[1]["held_out_by_task"]
    before = [result["training"]["held_out_by_task_before"] for result in results]
    assert before[0] == before[1]  # one base model, one held-out set: the seeds differ only in training
    by_task = results[0]["held_out_by_task"]
    assert results[0]["training"]["held_out_loss_after"] == pytest.approx(sum(by_task.values()) / 2)
    scores = results[0]["held_out_scores"]
    assert scores["mean"] == results[0]["training"]["held_out_loss_after"]
    assert scores["by_task"]["arithmetic"]["sequences"] > 500 and 0 < scores["by_task"]["arithmetic"]["se"] < 1
    assert len(list((cache / "quantized").iterdir())) == 1
    assert not (tmp_path / "seed1" / "work" / "quantized").exists()
    assert results[1]["wall_s"]["quantize"] < results[0]["wall_s"]["quantize"]


def test_on_joined_data_the_peak_is_measured_on_the_worst_batch_and_agrees_with_the_estimate(tiny_folder, tmp_path):
    """Packed text and padded questions in one data set: some batches pad (attention runs with a mask), so the
    plan is made for padded batches; the data's worst batch is measured even where the schedule never trains
    on it, and the largest footprint agrees with the memory model to the byte in every persistent term."""
    plan = mixed_plan(tiny_folder, steps=1, padded_batches=True)  # one step: its batch need not be the worst
    request = MaterializeRequest(plan=plan, output=tmp_path / "run", data="python-reference+arithmetic", exact_match_examples=0)
    memory = materialize(request)["memory"]
    assert memory["measured_persistent_bytes"] == memory["estimated_persistent_bytes"]
    assert memory["measured_peak_bytes"] <= memory["estimate"]["total_bytes"]
    assert memory["measured_peak_bytes"] == pytest.approx(memory["estimate"]["total_bytes"], rel=0.01)


def test_a_plan_made_for_packed_batches_is_refused_on_data_that_pads_where_that_breaks_its_budget(tiny_folder, tmp_path):
    spec = tiny_spec("llama", layers=4)
    packed = mixed_plan(tiny_folder)
    tight = with_memory(packed.model_copy(update={"budget": Budget(bytes=packed.memory.total_bytes, text="tight")}), spec)
    plan_path = tmp_path / "plan.yaml"
    save_plan(tight, plan_path)
    assert run("materialize", plan_path, "-o", tmp_path / "text", "--data", "python-reference", "--check").exit_code == 0
    refused = run("materialize", plan_path, "-o", tmp_path / "joined", "--data", "python-reference+arithmetic", "--check")
    assert_refused(refused)
    assert "made for batches without padding" in refused.stderr and "over the budget" in refused.stderr
    verdict = run("plan", "verify", plan_path, "--model", tiny_folder, "--data", "python-reference+arithmetic")
    assert verdict.exit_code == 1
    assert "note: the plan was made for batches without padding" in verdict.output
    assert "not verified: estimated peak" in verdict.output and "exceeds the budget" in verdict.output
    assert run("plan", "verify", plan_path, "--model", tiny_folder, "--data", "python-reference").exit_code == 0
