"""`qra compile` on a tiny Llama with a cheap fidelity ladder: every stage runs, the plan verifies and
materializes, an interrupted compile resumes to the same plan, and impossible budgets fail cleanly."""

import json
import random
import re

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from qra.cli import app
from qra.compiler.compile import (
    CompileRequest, Effort, baseline_plan, budget_bounds, build_evaluator, compile_plan, finalists_of, prepare, resolve,
)
from qra.compiler.space import Gene, build_space
from qra.compiler.strategies import Problem, SearchResult, uniform_config
from qra.compiler.strategies.driver import Evaluation
from qra.compiler.importance import Importance, flat_importance
from qra.errors import QraError
from qra.plans.io import load_plan
from qra.plans.schema import Budget, Device, Training
from qra.plans.verify import verify_plan
from qra.runtime.data import CALIBRATION_SEQUENCES, calibration_sequences, load_dataset, training_features
from tiny import save_tiny_model, tiny_corpus, tiny_spec

CHEAP = Effort(10, (0, 0.5, 1), None, prior_probe_steps=2, prior_sequences=8, finalists=1, seeds=2)
TRAINING = Training(seq_len=24, batch_size=2, steps=4, learning_rate=5e-3)
DEVICE = Device(kind="cpu", context_bytes=0)
BITS, RANKS = (2, 4, 8), (4, 16)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny model, with a small text corpus beside it (`corpus_of`) to compile on."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_corpus(folder / "corpus.jsonl")
    return save_tiny_model(folder / "model", "llama", layers=2)


def corpus_of(model_folder) -> str:
    return str(model_folder.parent / "corpus.jsonl")


def middle_budget() -> int:
    space = build_space(tiny_spec("llama", layers=2), BITS, RANKS, TRAINING, DEVICE)
    low, high = budget_bounds(space)
    return (low + high) // 2


def request(folder, tmp_path, **changes) -> CompileRequest:
    settings = dict(
        model=str(folder), budget=Budget(bytes=middle_budget(), text="middle"), bits=BITS, ranks=RANKS,
        data=corpus_of(folder),
        effort=CHEAP, training=TRAINING, device=DEVICE, journal=tmp_path / "journal.jsonl", work=tmp_path / "work",
    )
    return CompileRequest(**(settings | changes))


def test_compile_runs_every_stage_and_writes_a_verified_plan_with_provenance(tiny_folder, tmp_path):
    scored, stages = [], []
    outcome = compile_plan(request(tiny_folder, tmp_path), on_progress=scored.append, on_stage=stages.append)
    plan = outcome.plan
    order = [stage.stage for stage in stages]
    assert order == sorted(order, key=["bit screen", "priors", "search", "final comparison"].index)  # stage by stage, in order
    assert order[0] == "bit screen" and order[-1] == "final comparison"
    final = [stage for stage in stages if stage.stage == "final comparison"]
    assert final[0].done == 0 and [stage.done for stage in stages if stage.stage == "search"][0] == 0  # each stage reports its start
    assert final[-1].done == final[-1].total == 2 * CHEAP.seeds and all(stage.run_share == 1 for stage in final[1:-1])
    assert final[-1].best == plan.predicted.score  # the closing report: the pick's scores, no further fine-tune
    probes = [stage.run_share for stage in stages if stage.stage == "priors" and stage.run_share]
    assert probes == [CHEAP.prior_probe_steps / TRAINING.steps] * len(RANKS)  # each probe's training prices a fine-tune
    assert [stage.uniform for stage in stages if stage.uniform is not None] == [plan.provenance.baselines[next(iter(plan.provenance.baselines))]]
    assert verify_plan(plan, tiny_spec("llama", layers=2)).verified
    space = build_space(tiny_spec("llama", layers=2), BITS, RANKS, TRAINING, DEVICE)
    assert all(space.cost(evaluation.config) <= plan.budget.bytes for evaluation in scored)
    assert 0 < len(scored) <= CHEAP.evaluations
    assert sum(plan.provenance.evaluations.values()) == len(scored)
    assert plan.provenance.baselines and plan.predicted.fidelity.startswith("f2 (step 4 of 4)")
    assert plan.provenance.truncated_at_step is None
    stages = {e.stage.split(":")[0] for e in scored}
    assert stages == {"evolution", "trbo"}


def test_every_fine_tune_the_compile_runs_is_a_search_evaluation_or_a_final_comparison_run(tiny_folder, tmp_path):
    """No uniform run on the search's seed for its own sake: uniform is judged on the fresh seeds only."""
    compiled = request(tiny_folder, tmp_path)
    prepared = prepare(compiled)
    runs = []
    evaluate = prepared.evaluator.evaluate
    prepared.evaluator.evaluate = lambda config, fidelity, seed=None: runs.append((fidelity, seed)) or evaluate(config, fidelity, seed)
    scored = []
    outcome = compile_plan(compiled, on_progress=scored.append, prepared=prepared)
    assert len(runs) == len(scored) + 2 * CHEAP.seeds  # one finalist and uniform, on each fresh seed
    assert sorted(seed for _, seed in runs if seed is not None) == sorted([1, 2] * 2)
    uniform = outcome.plan.provenance.finalists[0]
    assert outcome.plan.provenance.baselines == {uniform.name: pytest.approx(sum(uniform.scores.values()) / 2)}


def test_interrupted_compile_resumes_to_the_same_plan(tiny_folder, tmp_path):
    whole = compile_plan(request(tiny_folder, tmp_path / "whole"))

    kill_at = random.Random(len(whole.result.history)).randrange(1, len(whole.result.history))

    def kill(evaluation):
        if evaluation.index == kill_at:
            raise Killed

    with pytest.raises(Killed):
        compile_plan(request(tiny_folder, tmp_path / "killed"), on_progress=kill)
    resumed = compile_plan(request(tiny_folder, tmp_path / "killed", resume=True))
    assert resumed.plan.layers == whole.plan.layers
    assert resumed.result.replayed >= kill_at
    assert resumed.plan.predicted.score == pytest.approx(whole.plan.predicted.score)


def test_resuming_with_another_budget_refuses_the_journal_instead_of_replaying_its_scores(tiny_folder, tmp_path):
    def kill(evaluation):
        if evaluation.index == 2:
            raise Killed

    with pytest.raises(Killed):
        compile_plan(request(tiny_folder, tmp_path), on_progress=kill)
    other = Budget(bytes=middle_budget() - 1, text="other")
    with pytest.raises(QraError, match="written by another compile") as error:
        compile_plan(request(tiny_folder, tmp_path, budget=other, resume=True))
    assert error.value.exit_code == 2


def _searched(*scored: tuple[tuple[Gene, ...], int, float]) -> SearchResult:
    history = tuple(Evaluation(index, config, fidelity, score, "s", 1.0) for index, (config, fidelity, score) in enumerate(scored))
    best = min(history, key=lambda e: (-e.fidelity, e.score))
    return SearchResult(best.config, best.score, best.fidelity, history, {}, 0, 0)


def test_finalists_come_from_the_highest_rung_that_scored_a_non_uniform_configuration():
    space = build_space(tiny_spec("llama", layers=2), BITS, RANKS, TRAINING, DEVICE)
    problem = Problem(space, flat_importance(2, BITS, RANKS), budget=10**12)
    uniform4, uniform8 = (Gene(4, 4), Gene(4, 4)), (Gene(8, 4), Gene(8, 4))
    mixed, better = (Gene(8, 4), Gene(4, 16)), (Gene(4, 16), Gene(8, 4))
    at_the_screen = _searched((uniform8, 0, 2.0), (uniform4, 1, 1.6), (uniform8, 1, 1.5), (mixed, 1, 1.4), (better, 1, 1.3))
    assert finalists_of(at_the_screen, problem, 2, 0) == ([better, mixed], uniform8)  # no challenger reached the top
    at_the_top = _searched((mixed, 1, 1.4), (better, 1, 1.3), (mixed, 2, 1.1), (better, 2, 1.2))
    assert finalists_of(at_the_top, problem, 2, 0) == ([mixed, better], uniform_config(problem))  # no uniform there: the default
    assert finalists_of(at_the_top, problem, 1, 0)[0] == [mixed]  # the top rung decides, not the screen
    one_at_the_top = _searched((mixed, 1, 1.4), (better, 1, 1.3), (uniform4, 2, 1.15), (mixed, 2, 1.1))
    assert finalists_of(one_at_the_top, problem, 2, 0) == ([mixed, better], uniform4)  # the screen fills the second


def test_finalists_scored_at_step_0_are_tried_in_the_order_of_the_priors():
    space = build_space(tiny_spec("llama", layers=2), BITS, RANKS, TRAINING, DEVICE)
    # the priors: the first unit gains from rank and loses little at 4 bits, the second the other way round
    importance = Importance(sensitivity=({4: 0.01, 8: 0.0, 16: 0.0}, {4: 0.2, 8: 0.01, 16: 0.0}),
                            plasticity=({4: 0.0, 16: 0.1}, {4: 0.0, 16: 0.0}))
    problem = Problem(space, importance, budget=10**12)
    uniform4 = (Gene(4, 4), Gene(4, 4))
    rank_only, bits = (Gene(4, 16), Gene(4, 4)), (Gene(4, 4), Gene(8, 4))  # priors: lose 0.11 and 0.02
    at_step_0 = _searched((uniform4, 0, 2.0), (rank_only, 0, 2.0), (bits, 0, 2.1))
    assert finalists_of(at_step_0, problem, 2, untrained=0) == ([bits, rank_only], uniform4)  # step 0 cannot see rank
    assert finalists_of(at_step_0, problem, 2, untrained=None) == ([rank_only, bits], uniform4)  # no priors: by score
    at_the_screen = _searched((rank_only, 1, 1.5), (bits, 1, 1.6))
    assert finalists_of(at_the_screen, problem, 2, untrained=0)[0] == [rank_only, bits]  # a trained rung's order stands
    # a tie at step 0 (the same bits) is broken by the priors: of two rank-only variants, the one that gains more
    more_rank = (Gene(4, 16), Gene(4, 4))
    less_rank = (Gene(4, 4), Gene(4, 16))  # priors: the second unit gains nothing from rank
    tied = _searched((uniform4, 0, 2.0), (less_rank, 0, 2.0), (more_rank, 0, 2.0), (bits, 0, 2.1))
    assert finalists_of(tied, problem, 1, untrained=0)[0] == [more_rank]


def test_the_plan_is_a_finalist_only_if_it_beats_uniform_beyond_two_paired_standard_errors(tiny_folder, tmp_path):
    plan = compile_plan(request(tiny_folder, tmp_path)).plan
    uniform, *finalists = plan.provenance.finalists
    assert uniform.name.startswith("uniform") and set(uniform.scores) == {1, 2}  # fresh seeds, not the search's 0
    assert all(set(finalist.scores) == {1, 2} and finalist.paired_se is not None for finalist in finalists)
    planned = ",".join(f"{layer.bits}:{layer.rank}" for layer in plan.layers)
    winners = [f for f in finalists if f.paired_difference < -2 * f.paired_se]
    if planned == uniform.config:
        assert not winners and "the plan is the uniform configuration" in plan.provenance.note
    else:
        assert [f.config for f in winners if f.config == planned]
    chosen = next(f for f in plan.provenance.finalists if f.config == planned)
    assert plan.predicted.score == pytest.approx(sum(chosen.scores.values()) / 2)


def test_baseline_plans_share_the_searchs_priors_and_verify_unscored(tiny_folder, tmp_path):
    compiled = request(tiny_folder, tmp_path)
    prepared = prepare(compiled)
    outcome = compile_plan(compiled, prepared=prepared)
    [journal] = (tmp_path / "work" / "priors").glob("*.json")  # beside it, the lock file its writers take
    priors = journal.read_text()
    spec = tiny_spec("llama", layers=2)
    for name in ("uniform", "sequential", "heuristic"):
        plan = baseline_plan(compiled, prepared, name)
        assert plan.provenance.strategy == name and plan.predicted.score is None
        assert verify_plan(plan, spec).verified
        assert plan.model == outcome.plan.model and plan.budget == outcome.plan.budget
    assert {layer.bits for layer in baseline_plan(compiled, prepared, "uniform").layers} == {4}
    assert journal.read_text() == priors
    with pytest.raises(QraError, match="unknown baseline"):
        baseline_plan(compiled, prepared, "best")


def test_a_request_that_names_no_granularity_takes_its_efforts(tiny_folder, tmp_path):
    assert request(tiny_folder, tmp_path, effort="quick").granularity == "layer"
    assert resolve(request(tiny_folder, tmp_path, effort="standard")).space.granularity == "module"
    assert request(tiny_folder, tmp_path, effort="thorough").granularity == "module"
    assert request(tiny_folder, tmp_path, effort="standard", granularity="layer").granularity == "layer"
    assert request(tiny_folder, tmp_path, effort=CHEAP).granularity == "layer"


def test_budget_below_the_minimum_fails_with_the_minimum(tiny_folder, tmp_path):
    with pytest.raises(QraError, match="smallest possible footprint"):
        compile_plan(request(tiny_folder, tmp_path, budget=Budget(bytes=1000, text="1kB")))


def test_budget_below_the_minimum_is_one_line_and_exit_2_from_the_command_line(tiny_folder, tmp_path):
    result = CliRunner().invoke(app, [
        "compile", "--model", str(tiny_folder), "--budget", "1kB", "-o", str(tmp_path / "plan.yaml"),
        "--seq-len", "24", "--batch-size", "2", "--device", "cpu", "--context", "0",
    ])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: budget 1kB is below the smallest possible footprint")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "plan.yaml").exists()


def test_a_budget_above_the_maximum_returns_the_best_plan(tiny_folder, tmp_path):
    outcome = compile_plan(request(tiny_folder, tmp_path, budget=Budget(bytes=10**12, text="1TB"),
                                   effort=Effort(3, CHEAP.rungs, None, 2, 2, 1), strategy="uniform"))
    assert outcome.above_maximum
    assert outcome.plan.memory.headroom_bytes > 0


def test_compile_from_the_command_line_says_what_the_paired_comparison_decided_and_the_plan_materializes(tiny_folder, tmp_path):
    plan_path = tmp_path / "plan.yaml"
    runner = CliRunner()
    result = runner.invoke(app, [
        "compile", "--model", str(tiny_folder), "--budget", str(middle_budget()), "-o", str(plan_path), "--data", corpus_of(tiny_folder),
        "--bits", "2,4,8", "--ranks", "4,16", "--seq-len", "24", "--batch-size", "2", "--steps", "4", "--learning-rate", "5e-3",
        "--device", "cpu", "--context", "0",
    ])
    assert result.exit_code == 0, result.output
    assert "predicted held-out loss" in result.stdout and re.search(r"uniform \d+-bit rank \d+: \d", result.stdout)
    # stderr is not a terminal here: the progress is one line per stage, with its counts and the compile's ETA
    stage_lines = [line for line in result.stderr.splitlines() if re.match(r"(priors|search|final comparison): \d+/\d+", line)]
    assert [line.split(":")[0] for line in stage_lines] == ["priors", "search", "final comparison"]
    assert all("compile ETA" in line for line in stage_lines[:2]) and "uniform" in stage_lines[-1]
    plan = load_plan(plan_path)
    emitted_uniform = len({(layer.bits, layer.rank) for layer in plan.layers}) == 1 and not any(layer.modules for layer in plan.layers)
    assert ("the plan is uniform" if emitted_uniform else "the plan beats it by") in result.stdout
    assert runner.invoke(app, ["plan", "verify", str(plan_path)]).exit_code == 0
    result = runner.invoke(app, ["materialize", str(plan_path), "-o", str(tmp_path / "run"), "--data", corpus_of(tiny_folder)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["memory"]["within_budget"]


def test_the_search_quantizes_with_the_calibration_sequences_materialize_gives_gptqmodel(tiny_folder, tmp_path):
    cache = build_evaluator(request(tiny_folder, tmp_path)).cache
    calibrated = [row[mask.bool()].tolist() for batch in cache.calibration
                  for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    features = training_features(load_dataset(corpus_of(tiny_folder)).train, tokenizer, TRAINING.seq_len)
    assert calibrated == calibration_sequences(features)  # what materialize passes to gptqmodel's pass
    assert len(calibrated) == min(CALIBRATION_SEQUENCES, len(features))
