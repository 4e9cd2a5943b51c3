"""Every plan shipped in plans/ is a reusable artifact: it verifies against its model (fingerprint and
budget) and `qra materialize` accepts it. The shipped plans are for the embedded SmolLM2-135M, which the
install puts in place (tools/install.sh)."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qra.cli import app
from qra.plans.io import load_plan
from qra.runtime.materialize import MaterializeRequest, materialize

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
def test_a_shipped_plan_keeps_its_budget_when_materialized_on_its_own_data(path, tmp_path):
    """gptqmodel's quantization at the planned bits, then a few training steps on the data the plan was
    compiled for, each batch that no measured batch covers measured: the peak stays within the budget."""
    plan = load_plan(path)
    short = plan.model_copy(update={"training": plan.training.model_copy(update={"steps": 3})})
    request = MaterializeRequest(plan=short, output=tmp_path / "run", data=compiled_for(plan), exact_match_examples=0)
    memory = materialize(request)["memory"]
    assert memory["within_budget"], memory
    assert memory["measured_persistent_bytes"] <= memory["estimated_persistent_bytes"]
