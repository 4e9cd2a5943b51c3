"""Every plan shipped in plans/ is a reusable artifact: it verifies against its model (fingerprint and
budget) and `qra materialize` accepts it. The shipped plans are for the embedded SmolLM2-135M, which the
install puts in place (tools/install.sh)."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qra.cli import app
from qra.models import load_config, load_model, resolve_model
from qra.plans.io import load_plan
from qra.plans.spec import spec_from_config
from qra.runtime.data import load_dataset, pads
from qra.runtime.footprint import measure_plan_footprint

SHIPPED = sorted((Path(__file__).parents[1] / "plans").glob("*.yaml"))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_plans_are_shipped_and_named_by_model_budget_and_granularity():
    assert SHIPPED, "no plan in plans/"
    for path in SHIPPED:
        plan = load_plan(path)
        granularity = "module" if "granularity module" in plan.provenance.note else "layer"
        assert path.name == f"{plan.model.id}-{plan.budget.text}{'-module' if granularity == 'module' else ''}.yaml"
        assert plan.provenance.strategy == "autoqra" and plan.provenance.evaluations
        assert plan.provenance.finalists, "compiled by the search with its final paired comparison"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_plan_verifies_against_its_model(path):
    result = run("plan", "verify", path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_materialize_accepts_a_shipped_plan(path, tmp_path):
    result = run("materialize", path, "-o", tmp_path / "run", "--data", "python-reference+arithmetic", "--check")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("accepted:")


def compiled_for(plan) -> str:
    """The data a shipped plan was compiled for, as its provenance note records it."""
    return re.search(r"\bdata ([^,]+),", plan.provenance.note).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_plan_keeps_its_budget_in_a_measured_training_step(path):
    """SmolLM2 built as the plan quantizes it (gptqmodel's packed modules at each module's bits, zero-filled:
    a step's memory depends on shapes and dtypes, not values; tests/test_gptq_memory.py shows the tensors and
    the step equal a real quantization's), LoRA at each module's rank, one training step on the worst batch
    the plan's data gives (full length, padded where its batches pad): the persistent bytes are at most the
    estimate's and the peak stays within the budget. (`qra materialize` itself, with gptqmodel's quantization
    and real batches, is tested on tiny models in test_materialize.py and on SmolLM2 by the GPU check's dry run.)"""
    plan = load_plan(path)
    spec = spec_from_config(load_config(resolve_model(plan.model.id)))
    model, _ = load_model(resolve_model(plan.model.id), plan.training.compute_dtype)
    memory = measure_plan_footprint(plan, spec, model)
    assert plan.training.padded_batches == pads(load_dataset(compiled_for(plan)), plan.training.batch_size)
    assert memory["within_budget"], memory
    assert memory["measured_persistent_bytes"] <= memory["estimated_persistent_bytes"]
