"""benchmarks/bench_quality.py: how seed runs become the reported table, paired differences and targets, and
a whole (tiny) benchmark run end to end on the one pipeline."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
from bench_quality import CEILING, gap_closed, markdown, paired, plot_quality, publish, run_benchmark, summarize, targets

from qra.benchmark import Settings, budgets_for, compile_request, refused_finalist
from qra.plans.memory import estimate_memory, uniform_settings
from qra.plans.schema import Budget, Device, Training
from qra.plans.spec import resolve_spec
from qra.testing import save_tiny_model, tiny_corpus, tiny_spec


def seed_run(seed: int, reference: float, arithmetic: float) -> dict:
    """What a fine-tune reports for one seed, reduced to what the benchmark reads."""
    return {
        "seed": seed, "loss": (reference + arithmetic) / 2, "se": 0.01,
        "held_out_by_task": {"python-reference": reference, "arithmetic": arithmetic},
        "se_by_task": {"python-reference": 0.02, "arithmetic": 0.01}, "exact_match": None, "train_s": 60.0,
    }


def row(losses: list[float]) -> dict:
    return summarize([seed_run(seed, loss, loss) for seed, loss in enumerate(losses)])


def table(**losses: list[float]) -> dict:
    rows = {method.replace("_", "-"): row(values) for method, values in losses.items()}
    rows[CEILING] = rows.pop("ceiling")
    for entry in rows.values():
        entry["gap_closed"] = gap_closed(entry["loss"]["mean"], rows["uniform"]["loss"]["mean"], rows[CEILING]["loss"]["mean"])
    return rows


def test_summary_takes_the_mean_of_the_tasks_then_mean_and_spread_over_seeds():
    summary = summarize([seed_run(0, 2.0, 1.0), seed_run(1, 2.2, 1.2)])
    assert summary["loss"]["values"] == pytest.approx([1.5, 1.7])
    assert summary["loss"]["mean"] == pytest.approx(1.6)
    assert summary["loss"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["loss arithmetic"]["mean"] == pytest.approx(1.1)
    assert summary["se python-reference"] == pytest.approx(0.02)
    assert summary["seeds"] == [0, 1]


def test_gap_closed_is_the_share_of_uniform_to_ceiling_recovered():
    assert gap_closed(2.5, uniform=3.0, ceiling=2.0) == pytest.approx(0.5)
    assert gap_closed(3.0, uniform=3.0, ceiling=2.0) == 0
    assert gap_closed(3.2, uniform=3.0, ceiling=2.0) == pytest.approx(-0.2)
    assert gap_closed(2.5, uniform=2.0, ceiling=2.0) is None


def test_a_win_is_paired_by_seed_and_beyond_two_standard_errors():
    # autoqra is 0.05 below uniform on every seed although the seeds themselves spread by 0.3
    rows = table(autoqra_module=[2.35, 2.65, 2.95], uniform=[2.4, 2.7, 3.0], llamacpp=[2.3, 2.9, 3.0],
                 sequential=[2.4, 2.7, 3.0], heuristic=[2.45, 2.75, 3.05], ceiling=[2.3, 2.6, 2.9])
    assert paired(rows, "autoqra-module", "uniform") == {"mean": pytest.approx(-0.05), "se": pytest.approx(0, abs=1e-12),
                                                         "seeds": 3, "wins": True}
    assert not paired(rows, "autoqra-module", "llamacpp")["wins"]  # -0.05, +0.25 and -0.05: noise
    verdicts = targets(rows, "B1", {"autoqra-module": 2.66})
    assert verdicts["autoqra-module"] == {
        "beats uniform": True, "closes 40% of the gap": True, "beats llamacpp": False, "beats sequential": True,
        "beats heuristic": True, "prediction within 1 SE": True,
    }
    assert targets(rows, "B2", {"autoqra-module": 2.0})["autoqra-module"] == {"beats uniform": True, "prediction within 1 SE": False}


def test_b2_admits_no_uniform_4_bit_configuration_and_b1_is_uniform_4_bit_rank_8():
    spec, training, device = tiny_spec(), Training(seq_len=128, batch_size=4), Device()
    budgets = budgets_for(spec, training, device)
    four_r8 = estimate_memory(spec, uniform_settings(4, 8), training, device).total_bytes
    four_r4 = estimate_memory(spec, uniform_settings(4, 4), training, device).total_bytes
    three_r4 = estimate_memory(spec, uniform_settings(3, 4), training, device).total_bytes
    assert four_r8 <= budgets["B1"].bytes < four_r8 + 10**5
    assert three_r4 < budgets["B2"].bytes < four_r4


def test_report_has_one_table_row_per_method_and_budget_and_a_plot(tmp_path):
    rows = table(autoqra_module=[2.4, 2.5, 2.45], uniform=[3.0, 3.1, 3.05], sequential=[2.9, 2.95, 3.0],
                 heuristic=[3.0, 3.0, 3.0], llamacpp=[2.95, 3.0, 3.05], ceiling=[2.0, 2.1, 2.05])
    for method, entry in rows.items():
        entry["paired_vs_uniform"] = None if method == "uniform" else paired(rows, method, "uniform")
        entry["peak_mb"], entry["peak"] = 1000.0, "estimated"
    report = {
        "model": "tiny", "data": "python-reference+arithmetic", "steps": 40, "batch_size": 4, "seq_len": 128, "seeds": [10, 11, 12],
        "learning_rate": 1e-3, "learning_rates": {"0.001": {"0": 2.0, "mean": 2.0, "std": 0.0}}, "fine_tune": "evaluator",
        "budgets": {"B1": {"budget": "1000.0MB", "budget_bytes": 10**9, "rows": rows, "predicted": {"autoqra-module": 2.46},
                           "targets": targets(rows, "B1", {"autoqra-module": 2.46}), "patterns": {"autoqra-module": "..."}}},
    }
    text = markdown(report)
    assert sum(line.startswith("| B1 (1000.0MB) |") for line in text.splitlines()) == 6
    assert "| B1 (1000.0MB) | autoqra-module | 1000.0 (estimated) | 2.4500 ± 0.0500 | 2.4500 ± 0.0500 [±0.010] |" in text
    assert "-0.6000 ± 0.0000 (win)" in text
    assert "learning rate 0.001 (the lowest mean + std of uniform 4-bit r8 over seeds 0: 0.001: 2.0000 ± 0.0000)" in text
    plot_quality(report, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG")
    # a materialize check written into the same folder keeps the evaluator benchmark's report
    budgets, settings = {"B1": Budget(bytes=10**9, text="1000.0MB")}, Settings("tiny", "d", 128, 4, 40, "quick", (10,))
    publish(report, tmp_path / "out", None, budgets, settings)
    publish({**report, "fine_tune": "materialize"}, tmp_path / "out", tmp_path / "docs", budgets, settings)
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["fine_tune"] == "evaluator"
    assert json.loads((tmp_path / "out" / "quality-materialize.json").read_text())["fine_tune"] == "materialize"
    assert json.loads((tmp_path / "docs" / "quality.json").read_text())["fine_tune"] == "materialize"


def test_a_tiny_benchmark_runs_every_stage_and_reruns_from_its_results(tmp_path):
    folder = save_tiny_model(tmp_path / "model", layers=2)
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", examples=40)
    args = Namespace(out=tmp_path / "out", lr_grid="1e-3,5e-3", budgets="B1", fine_tune="evaluator", measure_peaks=False,
                     weight_source_gap=False, ship=None, report=None, methods="", lr_seeds="0,20", learning_rate=None)
    settings = Settings(str(folder), str(corpus), 24, 2, 2, "quick", (10, 11), granularities=("module",), bits=(2, 4, 8),
                        ranks=(4, 8))
    report = run_benchmark(args, settings)
    rows = report["budgets"]["B1"]["rows"]
    assert set(rows) - {"finalist-module"} == {"autoqra-module", "uniform", "sequential", "heuristic", "llamacpp", CEILING}
    if "finalist-module" in rows:  # the final pick refused its finalist: the plan is uniform, the finalist is benched too
        assert rows["autoqra-module"]["loss"] == rows["uniform"]["loss"] and rows["finalist-module"]["paired_vs_uniform"]
    assert all(row["seeds"] == [10, 11] for row in rows.values())
    assert report["learning_rate"] in (1e-3, 5e-3) and set(report["learning_rates"]) == {"0.001", "0.005"}
    chosen = report["learning_rates"][f"{report['learning_rate']:g}"]
    assert chosen["mean"] == pytest.approx((chosen["0"] + chosen["20"]) / 2)
    # the most stable best: the lowest mean + std over the seeds, a single run's bad case
    assert chosen["mean"] + chosen["std"] == min(scores["mean"] + scores["std"] for scores in report["learning_rates"].values())
    finalists = report["budgets"]["B1"]["compile"]["autoqra-module"]["finalists"]
    # the compile's fresh seeds, none of the bench's (the third runs only where a finalist can still win)
    assert finalists and {1, 2} <= set(finalists[0]["scores"]) <= {1, 2, 3}
    saved = json.loads((args.out / "quality.json").read_text())
    _observed_runs_end_at_the_benchmarks_scores(args.out, rows["uniform"])
    rerun = run_benchmark(args, settings)
    assert json.loads(json.dumps(rerun))["budgets"] == saved["budgets"]  # every run reused
    args.methods = "llamacpp"
    only = run_benchmark(args, settings)["budgets"]["B1"]["rows"]
    assert set(only) == {"llamacpp", "uniform"} and only["llamacpp"]["gap_closed"] is None
    args.methods, args.learning_rate = "", 2e-2
    with pytest.raises(SystemExit, match="another schedule: learning_rate"):
        run_benchmark(args, settings)  # the plans on disk were compiled at the rate chosen above


def test_a_finalist_the_compile_refused_is_benched_beside_the_uniform_plan_it_lost_to():
    from qra.compiler.space import Gene, build_space, config_key
    from qra.plans.build import model_ref
    from qra.plans.schema import Budget, Plan, Provenance, SeedScores

    spec = tiny_spec("llama", layers=2)
    training = Training(steps=4, batch_size=2, seq_len=32)
    space = build_space(spec, (4, 8), (4, 8), training, Device(kind="cpu", context_bytes=0))
    uniform, mixed = (Gene(4, 8), Gene(4, 8)), (Gene(8, 4), Gene(4, 8))
    records = [SeedScores(name="uniform 4-bit rank 8", config=config_key(uniform), scores={1: 2.0, 2: 2.1}),
               SeedScores(name="finalist 1", config=config_key(mixed), scores={1: 1.9, 2: 2.1},
                          paired_difference=-0.05, paired_se=0.05)]
    plan = Plan(model=model_ref(spec, "tiny", None), budget=Budget(bytes=10**9, text="1GB"), training=training,
                layers=space.layer_plans(uniform), provenance=Provenance(finalists=records))
    finalist = refused_finalist(plan, space, spec)
    assert finalist.layers == space.layer_plans(mixed) and finalist.training == plan.training
    assert finalist.memory is not None and finalist.predicted.score is None
    # a plan that is the finalist itself has none refused
    assert refused_finalist(plan.model_copy(update={"layers": space.layer_plans(mixed)}), space, spec) is None


def test_the_prediction_is_checked_against_the_bench_with_both_means_standard_errors():
    from bench_quality import prediction_error, prediction_scores

    from qra.compiler.space import Gene, build_space
    from qra.plans.build import model_ref
    from qra.plans.schema import Plan, Prediction, Provenance, SeedScores

    spec = tiny_spec("llama", layers=2)
    space = build_space(spec, (4, 8), (4, 8), Training(), Device(kind="cpu", context_bytes=0))
    records = [SeedScores(name="uniform 4-bit rank 8", config="u", scores={1: 2.0, 2: 2.2, 3: 2.1}),
               SeedScores(name="finalist 1", config="f", scores={1: 1.9, 2: 2.0, 3: 2.2}, paired_difference=-0.067, paired_se=0.1)]
    plan = Plan(model=model_ref(spec, "tiny", None), budget=Budget(bytes=10**9, text="1GB"), training=Training(),
                layers=space.layer_plans((Gene(4, 8), Gene(4, 8))), predicted=Prediction(score=2.1), provenance=Provenance(finalists=records))
    assert prediction_scores(plan) == [2.0, 2.2, 2.1]  # uniform's record: its mean is the prediction
    assert prediction_scores(plan.model_copy(update={"predicted": Prediction(score=6.1 / 3)})) == [1.9, 2.0, 2.2]
    error = prediction_error([2.0, 2.2, 2.1], row([2.0, 2.1, 2.3]))
    assert error["difference"] == pytest.approx(2.1 - (2.0 + 2.1 + 2.3) / 3)
    assert error["combined_se"] == pytest.approx((error["se_compile"] ** 2 + error["se_bench"] ** 2) ** 0.5)
    assert error["se_compile"] == pytest.approx(0.1 / 3**0.5) and error["se_bench"] > error["se_compile"]
    assert prediction_error([2.0], row([2.0, 2.1])) is None  # one seed has no standard error
    assert prediction_scores(plan.model_copy(update={"predicted": Prediction()})) == []


def _observed_runs_end_at_the_benchmarks_scores(bench: Path, uniform: dict) -> None:
    """experiments/train_dynamics.py trains a benchmark's plan as the benchmark did, scoring it on the way."""
    from train_dynamics import bench_settings, method_plan, observe

    from qra.compiler.compile import build_evaluator

    settings = bench_settings(bench)
    budget = budgets_for(resolve_spec(settings.model).spec, settings.training(), Device())["B1"]
    evaluator = build_evaluator(compile_request(settings, budget, "layer", bench))
    plan = method_plan(bench, settings, "B1", "uniform", evaluator)
    observed = observe(evaluator, plan, 10, plan.training.max_grad_norm, every=1)
    assert [checkpoint["step"] for checkpoint in observed["checkpoints"]] == list(range(1, plan.training.steps + 1))
    assert len(observed["gradient_norms"]) == plan.training.steps
    for task, loss in observed["final"].items():
        assert loss == pytest.approx(uniform["loss " + task]["values"][0], abs=1e-4)


def test_fine_tunes_use_the_preparation_in_memory_or_an_evaluator_without_priors(monkeypatch, tmp_path):
    import bench_quality

    held: list[str] = []  # the models alive, by what loaded them

    class Loaded:
        def __init__(self, name: str) -> None:
            assert not held, f"{name} loaded while {held} is held"
            held.append(name)
            self.name = name

        @property
        def evaluator(self) -> "Loaded":
            return self

        def __del__(self) -> None:
            held.remove(self.name)

    monkeypatch.setattr(bench_quality, "prepare", lambda request: Loaded(f"prepared {request.granularity}"))
    monkeypatch.setattr(bench_quality, "build_evaluator", lambda request: Loaded("bare"))
    preparations, budget = bench_quality.Preparations(tmp_path), Budget(bytes=10**9, text="1000.0MB")
    settings = Settings("tiny", "arithmetic", 128, 4, 40, "quick", (10,))
    other = Settings("tiny", "arithmetic", 128, 4, 40, "quick", (10,), learning_rate=5e-3)
    assert preparations.get(settings, budget, "module").name == "prepared module"
    assert preparations.evaluator(settings, budget).name == "prepared module"  # any granularity fine-tunes a plan
    assert preparations.evaluator(other, budget).name == "bare"  # another schedule: loaded without priors
    assert held == ["bare"]
    assert preparations.evaluator(other, budget).name == "bare"
    assert preparations.get(settings, budget, "layer").name == "prepared layer" and held == ["prepared layer"]
