"""tools/bench_quality.py: how seed runs become the reported table, targets and plot (the runs themselves are
`qra compile` and `qra materialize`, tested on their own)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from bench_quality import CEILING, budget_for, gap_closed, markdown, plot_quality, summarize, verdicts  # noqa: E402

from qra.plans.memory import estimate_memory, uniform_settings  # noqa: E402
from qra.plans.schema import Device, Training  # noqa: E402
from tiny import tiny_spec  # noqa: E402


def seed_run(reference: float, arithmetic: float, exact: float = 0.5, peak: int = 10**9) -> dict:
    """What `materialize` reports for one seed, reduced to what the benchmark reads."""
    return {
        "held_out_by_task": {"python-reference": reference, "arithmetic": arithmetic},
        "exact_match": exact,
        "peak_bytes": peak,
        "peak": "measured",
        "train_s": 60.0,
    }


def row(losses: list[float], peak: int = 10**9) -> dict:
    return summarize([seed_run(loss, loss, peak=peak) for loss in losses])


def table(auto: list[float], uniform: list[float], sequential: list[float], ceiling: list[float]) -> dict:
    rows = {"autoqra": row(auto), "uniform": row(uniform), "sequential": row(sequential), "heuristic": row(uniform), CEILING: row(ceiling)}
    for entry in rows.values():
        entry["gap_closed"] = gap_closed(entry["loss"]["mean"], rows["uniform"]["loss"]["mean"], rows[CEILING]["loss"]["mean"])
    return rows


def test_summary_takes_the_mean_of_the_two_tasks_then_mean_and_spread_over_seeds():
    summary = summarize([seed_run(2.0, 1.0, 0.25, 900), seed_run(2.2, 1.2, 0.75, 1000)])
    assert summary["loss"]["values"] == pytest.approx([1.5, 1.7])
    assert summary["loss"]["mean"] == pytest.approx(1.6)
    assert summary["loss"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["loss arithmetic"]["mean"] == pytest.approx(1.1)
    assert summary["exact_match"]["mean"] == pytest.approx(0.5)
    assert summary["peak_bytes"] == 1000


def test_gap_closed_is_the_share_of_uniform_to_ceiling_recovered():
    assert gap_closed(2.5, uniform=3.0, ceiling=2.0) == pytest.approx(0.5)
    assert gap_closed(3.0, uniform=3.0, ceiling=2.0) == 0
    assert gap_closed(3.2, uniform=3.0, ceiling=2.0) == pytest.approx(-0.2)
    assert gap_closed(2.5, uniform=2.0, ceiling=2.0) is None


def test_targets_need_a_win_beyond_the_seed_spread_and_half_the_gap():
    clear = verdicts(table(auto=[2.4, 2.41, 2.42], uniform=[3.0, 3.01, 3.02], sequential=[2.9, 2.91, 2.92], ceiling=[2.0, 2.0, 2.0]))
    assert clear == {"beats_uniform_beyond_spread": True, "beats_sequential_beyond_spread": True, "closes_half_the_gap": True}
    overlapping = verdicts(table(auto=[2.8, 3.0, 2.6], uniform=[3.0, 2.9, 3.1], sequential=[2.7, 2.8, 2.9], ceiling=[2.0, 2.0, 2.0]))
    assert overlapping == {"beats_uniform_beyond_spread": False, "beats_sequential_beyond_spread": False, "closes_half_the_gap": False}


def test_the_budget_is_the_uniform_footprint_rounded_up_to_a_tenth_of_a_megabyte():
    spec, training, device = tiny_spec(), Training(seq_len=128, batch_size=4), Device()
    footprint = estimate_memory(spec, uniform_settings(4, 8), training, device).total_bytes
    budget = budget_for(spec, 4, training, device)
    assert footprint <= budget.bytes < footprint + 10**5
    assert budget.text.endswith("MB") and budget.bytes == int(float(budget.text[:-2]) * 10**6)


def test_report_has_one_table_row_per_method_and_budget_and_a_plot(tmp_path):
    rows = table(auto=[2.4, 2.5, 2.45], uniform=[3.0, 3.1, 3.05], sequential=[2.9, 2.95, 3.0], ceiling=[2.0, 2.1, 2.05])
    report = {
        "model": "tiny", "data": "python-reference+arithmetic", "steps": 40, "batch_size": 4, "seq_len": 128, "seeds": [0, 1, 2],
        "budgets": {"1.5MB": {"budget_bytes": 10**9, "rows": rows, "targets": verdicts(rows), "pattern": "mean rank by bits: ...",
                              "compile_scores": {"fidelity": "f2", "autoqra": 1.9231, "uniform 4-bit rank 8": 1.9148}}},
    }
    text = markdown(report)
    assert "The compile's own scores at f2: autoqra 1.9231, uniform 4-bit rank 8 1.9148." in text
    assert sum(line.startswith("| 1.5MB |") for line in text.splitlines()) == 5
    assert "| 1.5MB | autoqra | 3 | 1000.0 MB (measured) | 2.4500 ± 0.0500 |" in text
    plot_quality(report, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG")


def test_with_one_seed_there_is_no_spread_to_beat_so_the_comparison_is_undecided():
    targets = verdicts(table(auto=[2.4], uniform=[3.0], sequential=[2.9], ceiling=[2.0]))
    assert targets["beats_uniform_beyond_spread"] is None and targets["beats_sequential_beyond_spread"] is None
    assert targets["closes_half_the_gap"] is True


def test_a_fine_tune_on_the_evaluator_reports_each_task_and_the_plans_measured_peak_and_is_not_repeated(tmp_path):
    from bench_quality import EvaluatorRuns, Settings

    from qra.compiler.compile import CompileRequest, Effort, baseline_plan, prepare
    from qra.compiler.fidelity import FidelityLadder
    from qra.plans.schema import Budget
    from tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "model", layers=2)
    training = Training(seq_len=24, batch_size=2, steps=2, learning_rate=5e-3)
    request = CompileRequest(
        model=str(folder), budget=Budget(bytes=10**9, text="1GB"), data="python-reference+arithmetic", bits=(2, 4), ranks=(4, 8),
        effort=Effort(2, FidelityLadder(steps=(0, 1, 2)), prior_probe_steps=1, calibration_batches=1, held_out_batches=1),
        training=training, device=Device(kind="cpu", context_bytes=0), work=tmp_path / "work",
    )
    prepared = prepare(request)
    plan = baseline_plan(request, prepared, "uniform")
    settings = Settings(str(folder), request.data, 24, 2, 2, "quick", (0, 1), exact_match_examples=3, held_out_batches=1)
    runs = EvaluatorRuns(prepared.evaluator, settings)
    first = runs.run(plan, prepared.spec, 0, tmp_path / "seed0")
    assert set(first["held_out_by_task"]) == {"python-reference", "arithmetic"}
    assert 0.0 <= first["exact_match"] <= 1.0
    footprint = json.loads((tmp_path / "footprint.json").read_text())  # one per plan, shared by its seeds
    assert first["peak"] == "measured" and first["peak_bytes"] == footprint["memory"]["measured_peak_bytes"]
    assert abs(footprint["memory"]["persistent_error"]) < 0.05
    assert runs.run(plan, prepared.spec, 0, tmp_path / "seed0") == first
    assert runs.run(plan, prepared.spec, 1, tmp_path / "seed1")["held_out_by_task"] != first["held_out_by_task"]
    first_layer = plan.layers[0]
    recompiled = plan.model_copy(update={"layers": [first_layer.model_copy(update={"rank": first_layer.rank * 2}), *plan.layers[1:]]})
    assert runs.run(recompiled, prepared.spec, 0, tmp_path / "seed0")["plan"] != first["plan"]  # run again, not reused
