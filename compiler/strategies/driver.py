"""The search driver: asks a strategy, scores its candidates, tells it the scores, keeps the best.

The driver owns what all strategies share: the evaluation budget, the budget check on every scored
candidate, deduplication (a config asked again at a fidelity it was scored at is answered from memory
and spends nothing), the journal, and the incumbent (the best score at the highest fidelity scored).
"""

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from qra.compiler.journal import Journal, JournaledObjective, Objective
from qra.compiler.space import Config, config_key
from qra.compiler.strategies.base import Candidate, Strategy
from qra.errors import QraError

log = logging.getLogger(__name__)

STALE_LIMIT = 32  # consecutive asks answered from memory before the driver stops a strategy that cycles


@dataclass(frozen=True)
class Evaluation:
    index: int
    config: Config
    fidelity: int
    score: float
    stage: str
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    best_config: Config
    best_score: float
    best_fidelity: int
    history: tuple[Evaluation, ...]
    evaluations: dict[int, int]  # evaluations per fidelity (journal replays included)
    cache_hits: int  # asks answered from memory
    replayed: int  # evaluations answered from the journal


def _scorer(
    objective: Objective, journal: Journal | None
) -> tuple[Callable[[Candidate], float], JournaledObjective | None]:
    if journal is None:
        return (lambda c: float(objective.evaluate(c.config, c.fidelity))), None
    journaled = JournaledObjective(objective, journal)
    return (lambda c: journaled.evaluate(c.config, c.fidelity, c.stage)), journaled


def _check_budget(strategy: Strategy, candidate: Candidate) -> None:
    problem = strategy.problem
    cost = problem.space.cost(candidate.config)
    if cost > problem.budget:
        raise AssertionError(
            f"{type(strategy).__name__} asked to score {config_key(candidate.config)} at {cost:,} bytes, "
            f"over the budget of {problem.budget:,}: every candidate must be repaired first"
        )


def _best(history: list[Evaluation]) -> Evaluation:
    top = max(e.fidelity for e in history)
    return min((e for e in history if e.fidelity == top), key=lambda e: e.score)


def run_search(
    strategy: Strategy,
    objective: Objective,
    budget_evaluations: int,
    on_progress: Callable[[Evaluation], None] | None = None,
    journal: Journal | None = None,
) -> SearchResult:
    """Run `strategy` for at most `budget_evaluations` evaluations of `objective` (lower is better)."""
    if budget_evaluations < 1:
        raise QraError(f"the search needs at least one evaluation, got {budget_evaluations}")
    score, journaled = _scorer(objective, journal)
    strategy.start(budget_evaluations)
    history: list[Evaluation] = []
    known: dict[tuple[Config, int], float] = {}
    hits = stale = 0
    while len(history) < budget_evaluations and stale < STALE_LIMIT:
        batch = strategy.ask()
        if not batch:
            break
        for candidate in batch:
            _check_budget(strategy, candidate)
            key = (candidate.config, candidate.fidelity)
            if key in known:
                hits, stale = hits + 1, stale + 1
            elif len(history) < budget_evaluations:
                started = time.perf_counter()
                known[key] = score(candidate)
                record = Evaluation(len(history), candidate.config, candidate.fidelity, known[key], candidate.stage,
                                    time.perf_counter() - started)
                history.append(record)
                stale = 0
                if on_progress is not None:
                    on_progress(record)
            else:
                break
            strategy.tell(candidate, known[key])
    if not history:
        raise QraError(f"{type(strategy).__name__} asked for nothing to evaluate")
    best = _best(history)
    log.info("search done: %d evaluations, %d from memory, best %.5f at fidelity %d",
             len(history), hits, best.score, best.fidelity)
    return SearchResult(
        best_config=best.config, best_score=best.score, best_fidelity=best.fidelity, history=tuple(history),
        evaluations=dict(sorted(Counter(e.fidelity for e in history).items())), cache_hits=hits,
        replayed=sum(journaled.replayed.values()) if journaled is not None else 0,
    )
