"""Search strategies and the journal, on a synthetic objective over a tiny Llama's space (no training).

The synthetic loss: each unit's quantization damage (scaled by its sensitivity, partly recovered by
rank), a gain from rank, and damage that compounds across units; lower fidelities add seeded noise.
The priors are one-unit-at-a-time probes of it, so they miss the interactions, as measured priors do.
"""

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from qra.compiler.compile import EFFORTS
from qra.compiler.importance import Importance
from qra.compiler.journal import Journal
from qra.compiler.pool import Outcome
from qra.compiler.space import Config, Gene, SearchSpace, build_space, config_key
from qra.compiler.strategies import (
    BASELINES, STRATEGIES, AutoQRA, Baseline, Evolution, Problem, RandomSearch, TrustRegion, TrustRegionBO,
    run_search,
)
from qra.compiler.strategies.baselines import use_more_bits
from qra.errors import QraError
from qra.plans.schema import Device, Training
from qra.testing import tiny_spec

DAMAGE = {2: 1.0, 3: 0.35, 4: 0.12, 8: 0.01}
NOISE = (0.02, 0.01, 0.0)


@dataclass
class Synthetic:
    seed: int = 0
    units: int = 4
    calls: int = 0
    fail_at: int | None = None  # raise on this call (a killed compile)
    asked: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        n = self.units
        self.sensitivity = np.exp(rng.uniform(math.log(0.05), math.log(0.8), n))
        self.compensation = rng.uniform(0.2, 0.6, n)
        self.plasticity = rng.uniform(0.01, 0.08, n)
        scale = np.sqrt(np.outer(self.sensitivity, self.sensitivity))
        self.compounding = np.triu(rng.uniform(0, 0.3, (n, n)) * scale, 1)

    def true(self, config: Config) -> float:
        d = np.array([DAMAGE[g.bits] for g in config])
        p = np.array([math.log2(g.rank / 4) / 2 for g in config])
        damage = self.sensitivity @ (d * (1 - self.compensation * p))
        return float(1.0 + damage - self.plasticity @ p + d @ self.compounding @ d)

    def evaluate(self, config: Config, fidelity: int) -> float:
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.asked.append((config_key(config), fidelity))
        rng = np.random.default_rng([self.seed, fidelity, *(g.bits * 1000 + g.rank for g in config)])
        return self.true(config) + NOISE[fidelity] * float(rng.normal())

    def priors(self, space: SearchSpace) -> Importance:
        reference = space.uniform(space.bits[-1], space.ranks[0])

        def alone(unit: int, gene: Gene) -> float:
            return self.true(reference[:unit] + (gene,) + reference[unit + 1:])

        base = self.true(reference)
        n = len(space.units)
        return Importance(
            tuple({b: alone(u, Gene(b, space.ranks[0])) - base for b in space.bits} for u in range(n)),
            tuple({r: base - alone(u, Gene(space.bits[-1], r)) for r in space.ranks} for u in range(n)),
        )


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return build_space(tiny_spec("llama", layers=4), [2, 3, 4, 8], [4, 8, 16], Training(seq_len=32, batch_size=1),
                       Device(kind="cpu", context_bytes=0))


@pytest.fixture(scope="module")
def problem(space: SearchSpace) -> Problem:
    return Problem(space, Synthetic().priors(space), space.cost(space.uniform(4, 8)))


def _trace(result) -> list[tuple[str, int, float]]:
    return [(config_key(e.config), e.fidelity, e.score) for e in result.history]


@pytest.fixture(scope="module")
def module_problem() -> Problem:
    space = build_space(tiny_spec("llama", layers=8), [3, 4, 8], [8], Training(seq_len=32, batch_size=1),
                        Device(kind="cpu", context_bytes=0), granularity="module")
    mix = tuple(Gene(8 if unit.modules[0].short_name in ("v_proj", "down_proj") and unit.layer in (0, 3, 6, 7) else 4, 8)
                for unit in space.units)
    return Problem(space, Synthetic(units=len(space.units)).priors(space), space.cost(mix))


@pytest.mark.parametrize("name", [*STRATEGIES, *(f"baseline:{b}" for b in BASELINES)])
def test_every_scored_candidate_fits_the_budget(problem: Problem, module_problem: Problem, name: str) -> None:
    if name == "baseline:llamacpp":
        problem = module_problem
    strategy = Baseline(problem, name.split(":")[1]) if name.startswith("baseline:") else STRATEGIES[name](problem, 0)
    progress = []
    result = run_search(strategy, Synthetic(units=problem.units), 16, on_progress=progress.append)
    assert result.history and progress == list(result.history)
    assert all(problem.space.cost(e.config) <= problem.budget for e in result.history)
    assert problem.space.cost(result.best_config) <= problem.budget


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategies_are_deterministic_for_a_seed(problem: Problem, name: str) -> None:
    first = run_search(STRATEGIES[name](problem, 3), Synthetic(), 16)
    again = run_search(STRATEGIES[name](problem, 3), Synthetic(), 16)
    other = run_search(STRATEGIES[name](problem, 4), Synthetic(), 16)
    assert _trace(first) == _trace(again)
    assert first.best_config == again.best_config
    assert _trace(first) != _trace(other)


def test_trust_region_grows_on_success_and_shrinks_on_failure(problem: Problem) -> None:
    bo = TrustRegionBO(problem, seed=0, start=problem.repair(problem.space.uniform(4, 8)), radius=2,
                       success_tolerance=1, failure_tolerance=2)
    bo.start(10)
    scores = iter([1.0, 0.8, 0.9, 0.9, 0.95, 0.95])  # incumbent, success, then four failures
    radii = []
    for score in scores:
        (candidate,) = bo.ask()
        assert candidate.fidelity == problem.top and problem.fits(candidate.config)
        bo.tell(candidate, score)
        radii.append(bo.region.radius)
    assert radii == [2, 3, 3, 2, 2, 1]
    assert bo.incumbent_score == 0.8


def test_trust_region_candidates_run_to_the_top_only_if_they_beat_the_incumbent_one_rung_below(problem: Problem) -> None:
    start = problem.repair(problem.space.uniform(4, 8))
    bo = TrustRegionBO(problem, seed=0, start=start, radius=2, failure_tolerance=1, screen=1, screened=[(start, 1.2)])
    bo.start(10)
    (loser,) = bo.ask()  # the incumbent is known at the screen: screening starts at once
    assert loser.fidelity == 1 and loser.config != start
    bo.tell(loser, 1.3)  # worse than the incumbent's 1.2 at the screen: never runs to the top, a failure
    assert bo.region.radius == 1
    (winner,) = bo.ask()
    assert winner.fidelity == 1 and winner.config not in (start, loser.config)
    bo.tell(winner, 1.1)
    incumbent, promoted = bo.ask()  # the incumbent's top-rung run, deferred until now, and the challenger's
    assert (incumbent.config, incumbent.fidelity) == (start, problem.top)
    assert (promoted.config, promoted.fidelity) == (winner.config, problem.top)
    bo.tell(incumbent, 1.0)
    bo.tell(promoted, 0.9)
    assert (bo.incumbent, bo.incumbent_score) == (winner.config, 0.9)
    (after,) = bo.ask()
    assert after.fidelity == 1  # the new incumbent's screen score is known: screening goes on
    bo.tell(after, 1.0)
    (promoted_again,) = bo.ask()  # the incumbent's top-rung score is known now: the challenger runs alone
    assert (promoted_again.config, promoted_again.fidelity) == (after.config, problem.top)


def test_an_incumbent_no_challenger_beats_at_the_screen_never_runs_to_the_top(problem: Problem) -> None:
    start = problem.repair(problem.space.uniform(4, 8))
    bo = TrustRegionBO(problem, seed=0, start=start, screen=1, screened=[(start, 1.2)])
    bo.start(4)
    asked = []
    while batch := bo.ask():
        (candidate,) = batch
        asked.append(candidate)
        bo.tell(candidate, 1.3)
    # two screens; a third could not run on to the top with the incumbent (3 evaluations), so none is asked
    assert [c.fidelity for c in asked] == [1, 1] and start not in [c.config for c in asked]
    assert bo.incumbent_score is None


def test_trust_region_does_not_screen_when_no_evaluation_would_be_left_to_promote(problem: Problem) -> None:
    start = problem.repair(problem.space.uniform(4, 8))
    bo = TrustRegionBO(problem, seed=0, start=start, screen=1, screened=[(start, 1.2)], observed=[(start, 1.0)])
    bo.start(1)
    assert bo.ask() == []  # a screen (1) and a promotion (1) need two evaluations
    deferred = TrustRegionBO(problem, seed=0, start=start, screen=1, screened=[(start, 1.2)])
    deferred.start(2)
    assert deferred.ask() == []  # a screen, the incumbent's deferred top-rung run and the challenger's need three
    deferred.start(3)
    assert [c.fidelity for c in deferred.ask()] == [1]


def test_without_the_incumbents_screen_score_trust_region_candidates_go_straight_to_the_top(problem: Problem) -> None:
    bo = TrustRegionBO(problem, seed=0, start=problem.repair(problem.space.uniform(4, 8)), screen=1)
    bo.start(10)
    for score in (1.0, 1.1):
        (candidate,) = bo.ask()
        assert candidate.fidelity == problem.top
        bo.tell(candidate, score)


def test_autoqra_screens_its_refinement_at_the_rung_below_the_top(problem: Problem) -> None:
    synthetic = Synthetic()
    result = run_search(AutoQRA(problem, 0), synthetic, 24)
    refinement = [e for e in result.history if e.stage == "trbo"]
    assert 1 in {e.fidelity for e in refinement}
    # a refinement candidate at the top (the incumbent, or one that passed the screen) was scored one rung below first
    for evaluation in (e for e in refinement if e.fidelity == problem.top):
        below = [e for e in result.history if e.config == evaluation.config and e.fidelity == 1]
        assert below and below[0].index < evaluation.index


def test_the_quick_effort_scores_the_warm_started_population_at_step_0_only(problem: Problem) -> None:
    quick = EFFORTS["quick"]
    assert quick.ladder(40).steps == (0, 40)  # step 0, and the top rung the final comparison runs at
    result = run_search(AutoQRA(problem, 0, evolution_share=quick.evolution_share), Synthetic(), quick.evaluations)
    assert {e.stage for e in result.history} == {"evolution:f0"}  # no promotion, no refinement
    assert [e.fidelity for e in result.history] == [0] * 8


def test_the_standard_effort_keeps_the_evolution_and_cuts_the_refinement_to_its_first_proposals(problem: Problem) -> None:
    standard = EFFORTS["standard"]
    before = run_search(AutoQRA(problem, 0, evolution_share=0.6), Synthetic(), 48)  # the standard effort until r13
    after = run_search(AutoQRA(problem, 0, evolution_share=standard.evolution_share), Synthetic(), standard.evaluations)

    def stage(result, name: str) -> list[tuple]:
        return [(e.config, e.fidelity, e.score) for e in result.history if e.stage.startswith(name)]

    assert stage(after, "evolution") == stage(before, "evolution")
    refined = stage(after, "trbo")
    assert 0 < len(refined) <= 9 < len(stage(before, "trbo"))
    assert refined == stage(before, "trbo")[: len(refined)]


def test_trust_region_stays_within_its_bounds() -> None:
    region = TrustRegion(radius=1, min_radius=1, max_radius=2)
    assert region.update(False).update(False).update(False).radius == 1
    assert region.update(True).update(True).radius == 2


def test_surrogate_screening_evaluates_fewer_candidates_than_it_generates(problem: Problem) -> None:
    evolution = Evolution(problem, seed=0, population=8, offspring=24, screened=4)
    result = run_search(evolution, Synthetic(), 40)
    assert evolution.generation >= 3
    assert evolution.screened_in < evolution.generated
    lowest = sum(1 for e in result.history if e.fidelity == problem.fidelities[0])
    assert lowest <= 8 + evolution.screened_in
    # successive promotion: fewer evaluations at each fidelity up the ladder
    counts = [result.evaluations.get(f, 0) for f in problem.fidelities]
    assert counts[0] > counts[1] > counts[2] > 0


def test_the_first_generation_holds_the_largest_fitting_uniform_of_each_bit_width(problem: Problem) -> None:
    space = problem.space
    largest = {}
    for bits in space.bits:
        fitting = [rank for rank in space.ranks if problem.fits(space.uniform(bits, rank))]
        if fitting:
            largest[bits] = space.uniform(bits, fitting[-1])
    evolution = Evolution(problem, seed=0, population=8)
    assert 0 < len(largest) <= 8 // 2 and largest[4] == space.uniform(4, 8)
    evolution.start(30)
    first = {candidate.config for candidate in evolution.ask()}
    assert set(largest.values()) <= first


def test_autoqra_finds_the_optimum_more_often_than_random(space: SearchSpace, problem: Problem) -> None:
    genes = [Gene(b, r) for b in space.bits for r in space.ranks]
    feasible = [c for c in itertools.product(genes, repeat=len(space.units)) if problem.fits(c)]
    found = {"autoqra": 0, "random": 0}
    for seed in (1, 3, 7):  # over seeds 0-7: autoqra finds the optimum in 30 evaluations 8 times, random twice
        objective = Synthetic(seed=seed)
        best = min(objective.true(c) for c in feasible)
        seeded = Problem(space, objective.priors(space), problem.budget)
        for name, strategy in (("autoqra", AutoQRA(seeded, seed)), ("random", RandomSearch(seeded, seed))):
            result = run_search(strategy, Synthetic(seed=seed), 30)
            found[name] += objective.true(result.best_config) <= best + 1e-9
    assert found["autoqra"] >= found["random"] + 2


# the journal


KEY = "compile-a"


def _journaled(problem: Problem, path, objective: Synthetic, seed: int = 5, key: str = KEY):
    return run_search(AutoQRA(problem, seed), objective, 30, journal=Journal(path, key))


def test_an_interrupted_search_resumes_to_the_same_result(problem: Problem, tmp_path) -> None:
    uninterrupted = run_search(AutoQRA(problem, 5), Synthetic(), 30)
    path = tmp_path / "journal.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _journaled(problem, path, Synthetic(fail_at=17))
    assert len(Journal(path, KEY).records) == 17
    resumed_objective = Synthetic()
    resumed = _journaled(problem, path, resumed_objective)
    assert resumed.best_config == uninterrupted.best_config
    assert _trace(resumed) == _trace(uninterrupted)
    assert resumed.replayed == 17
    assert resumed_objective.calls == len(uninterrupted.history) - 17
    assert resumed_objective.asked == [(config_key(e.config), e.fidelity) for e in uninterrupted.history[17:]]
    assert len(Journal(path, KEY).records) == len(uninterrupted.history)


def test_a_journal_from_another_compile_is_refused(problem: Problem, tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _journaled(problem, path, Synthetic(fail_at=5), seed=5)
    with pytest.raises(QraError, match="does not match this compile") as error:
        _journaled(problem, path, Synthetic(), seed=6)
    assert error.value.exit_code == 2


def test_a_journal_for_another_key_is_refused_before_any_replay(problem: Problem, tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _journaled(problem, path, Synthetic(fail_at=5))
    objective = Synthetic()
    with pytest.raises(QraError, match="written by another compile") as error:
        _journaled(problem, path, objective, key="compile-b")
    assert error.value.exit_code == 2 and objective.calls == 0


def test_a_journal_without_a_header_is_refused(problem: Problem, tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text('{"index": 0, "config": "4:8,4:8", "fidelity": 0, "score": 2.0, "seconds": 1.0, "stage": "x"}\n')
    with pytest.raises(QraError, match="no header"):
        Journal(path, KEY)


def test_a_truncated_last_journal_line_is_ignored(problem: Problem, tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _journaled(problem, path, Synthetic(fail_at=6))
    with open(path, "ab") as handle:
        handle.write(b'{"index": 6, "config": "8:4,8:')  # killed mid-write
    assert len(Journal(path, KEY).records) == 6
    objective = Synthetic()
    resumed = _journaled(problem, path, objective)
    assert resumed.replayed == 6 and objective.calls == len(resumed.history) - 6
    assert len(Journal(path, KEY).records) == len(resumed.history)


def test_a_journal_whose_header_was_cut_off_starts_afresh(problem: Problem, tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text('{"journal": "qra-sea')  # killed while writing the header
    assert Journal(path, KEY).records == []
    objective = Synthetic()
    result = _journaled(problem, path, objective)
    assert result.replayed == 0 and objective.calls == len(result.history)
    assert json.loads(path.read_text().splitlines()[0]) == {"journal": "qra-search", "key": KEY}
    assert len(Journal(path, KEY).records) == len(result.history)


def test_a_corrupt_journal_line_is_an_error(tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps({"journal": "qra-search", "key": KEY}) + '\n{"index": 0}\n')
    with pytest.raises(QraError, match="line 2"):
        Journal(path, KEY)


# baselines


def test_llamacpp_raises_attn_v_and_ffn_down_in_the_layers_llama_cpp_picks(module_problem: Problem) -> None:
    # llama.cpp's use_more_bits for 8 layers: i < 1, i >= 7, or (i - 1) % 3 == 2, so layers 0, 3, 6, 7
    assert [layer for layer in range(8) if use_more_bits(layer, 8)] == [0, 3, 6, 7]
    assert [layer for layer in range(30) if use_more_bits(layer, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    config = BASELINES["llamacpp"](module_problem)
    assert module_problem.fits(config) and len({gene.rank for gene in config}) == 1
    raised = {(unit.layer, unit.modules[0].short_name) for unit, gene in zip(module_problem.space.units, config) if gene.bits == 8}
    assert raised == {(layer, name) for layer in (0, 3, 6, 7) for name in ("v_proj", "down_proj")}
    assert {gene.bits for gene in config} == {4, 8}


def test_llamacpp_needs_module_granularity(problem: Problem) -> None:
    with pytest.raises(QraError, match="--granularity module"):
        BASELINES["llamacpp"](problem)


def test_baselines_follow_their_rules(problem: Problem) -> None:
    uniform = BASELINES["uniform"](problem)
    assert len(set(uniform)) == 1 and uniform[0].bits == 4 and problem.fits(uniform)
    bigger = uniform[0].rank * 2
    assert bigger not in problem.space.ranks or not problem.fits(problem.space.uniform(4, bigger))
    sequential = BASELINES["sequential"](problem)
    assert problem.fits(sequential) and len({g.rank for g in sequential}) == 1
    most_sensitive = max(range(4), key=lambda u: problem.importance.sensitivity[u][2])
    assert sequential[most_sensitive].bits == max(g.bits for g in sequential)
    heuristic = BASELINES["heuristic"](problem)
    assert problem.fits(heuristic)
    assert min(heuristic[0].bits, heuristic[-1].bits) >= max(g.bits for g in heuristic[1:-1])


class LastFirst:
    """A pool (`qra.compiler.pool.Pool`) that finishes each batch last-asked-first, as parallel workers may."""

    def __init__(self, objective: Synthetic) -> None:
        self.objective = objective

    def run(self, tasks, on_done=None):
        outcomes = [Outcome(self.objective.evaluate(task.config, task.fidelity), 0.0) for task in tasks]
        for position in reversed(range(len(tasks))):
            if on_done is not None:
                on_done(position, outcomes[position])
        return outcomes

    def close(self) -> None:
        return None


def test_results_finishing_out_of_order_give_the_same_search_and_the_same_journal(problem: Problem, tmp_path) -> None:
    in_order = _journaled(problem, tmp_path / "in-order.jsonl", Synthetic())
    reversed_path = tmp_path / "last-first.jsonl"
    last_first = run_search(AutoQRA(problem, 5), None, 30, journal=Journal(reversed_path, KEY), pool=LastFirst(Synthetic()))
    assert _trace(last_first) == _trace(in_order) and last_first.best_config == in_order.best_config
    assert max(e.batch for e in last_first.history) < len(last_first.history)  # the strategy asked in batches
    records = lambda path: [(r.config, r.fidelity, r.score, r.stage) for r in Journal(path, KEY).records]  # noqa: E731
    assert records(reversed_path) == records(tmp_path / "in-order.jsonl")


def test_a_failed_run_is_journaled_without_a_score_and_replayed_as_failed(problem: Problem, tmp_path) -> None:
    path = tmp_path / "journal.jsonl"
    Journal(path, KEY).append(problem.space.uniform(4, 8), 2, math.inf, 1.0, "trbo", "worker died: killed")
    assert '"score": null' in path.read_text().splitlines()[1]
    record = Journal(path, KEY).records[0]
    assert record.score == math.inf and record.outcome.failed and record.failure == "worker died: killed"
