"""The search driver: asks a strategy, scores its candidates, tells it the scores, keeps the best.

The driver owns what all strategies share: the evaluation budget, the budget check on every scored
candidate, deduplication (a config asked again at a fidelity it was scored at is answered from memory
and spends nothing), the journal, and the incumbent (the best score at the highest fidelity scored).
Each batch a strategy asks is run at once on the pool (in this process, or on workers in parallel:
`qra.compiler.pool`), and the scores are told in the order they were asked, so the search is the same
wherever its candidates run. A candidate whose runs failed (its worker died twice) is told an infinite
loss: strategies rank it last and leave it out of their models.
"""

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from qra.compiler.journal import Journal, JournaledPool, Objective
from qra.compiler.pool import InProcessPool, Outcome, Pool, Task
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
    failure: str = ""
    batch: int = 0  # the strategy's ask it answers: the evaluations of one batch can run in parallel


@dataclass(frozen=True)
class SearchResult:
    best_config: Config
    best_score: float
    best_fidelity: int
    history: tuple[Evaluation, ...]
    evaluations: dict[int, int]  # evaluations per fidelity (journal replays included)
    cache_hits: int  # asks answered from memory
    replayed: int  # evaluations answered from the journal


def _check_budget(strategy: Strategy, candidate: Candidate) -> None:
    problem = strategy.problem
    cost = problem.space.cost(candidate.config)
    if cost > problem.budget:
        raise AssertionError(
            f"{type(strategy).__name__} asked to score {config_key(candidate.config)} at {cost:,} bytes, "
            f"over the budget of {problem.budget:,}: every candidate must be repaired first"
        )


def _best(history: list[Evaluation]) -> Evaluation:
    scored = [e for e in history if math.isfinite(e.score)]
    if not scored:
        raise QraError(f"every evaluation of the search failed; the first: {history[0].failure}")
    top = max(e.fidelity for e in scored)
    return min((e for e in scored if e.fidelity == top), key=lambda e: e.score)


def _fresh(batch: list[Candidate], known: dict[tuple[Config, int], float], room: int) -> tuple[list[Candidate], int]:
    """The candidates of `batch` to run (not known, not asked earlier in the batch, at most `room`), and how
    many asks the batch holds before the room ran out (the rest of the batch is dropped)."""
    fresh: list[Candidate] = []
    seen = set(known)
    for position, candidate in enumerate(batch):
        key = (candidate.config, candidate.fidelity)
        if key in seen:
            continue
        if len(fresh) == room:
            return fresh, position
        fresh.append(candidate)
        seen.add(key)
    return fresh, len(batch)


def run_search(
    strategy: Strategy,
    objective: Objective | None,
    budget_evaluations: int,
    on_progress: Callable[[Evaluation], None] | None = None,
    journal: Journal | None = None,
    pool: Pool | None = None,
) -> SearchResult:
    """Run `strategy` for at most `budget_evaluations` evaluations (lower is better) of `objective`, or of the
    tasks `pool` runs (which then replaces the objective)."""
    if budget_evaluations < 1:
        raise QraError(f"the search needs at least one evaluation, got {budget_evaluations}")
    if pool is None:
        if objective is None:
            raise ValueError("run_search needs an objective or a pool")
        pool = InProcessPool(objective)
    journaled = JournaledPool(pool, lambda task: journal) if journal is not None else None
    runner = journaled or pool
    strategy.start(budget_evaluations)
    history: list[Evaluation] = []
    known: dict[tuple[Config, int], float] = {}
    hits = stale = asks = 0
    while len(history) < budget_evaluations and stale < STALE_LIMIT:
        batch = strategy.ask()
        asks += 1
        if not batch:
            break
        for candidate in batch:
            _check_budget(strategy, candidate)
        fresh, asked = _fresh(batch, known, budget_evaluations - len(history))
        first = len(history)
        records: dict[int, Evaluation] = {}

        def done(position: int, outcome: Outcome, fresh: list[Candidate] = fresh, first: int = first,
                 records: dict[int, Evaluation] = records, ask: int = asks) -> None:
            candidate = fresh[position]
            records[position] = Evaluation(first + position, candidate.config, candidate.fidelity, outcome.score,
                                           candidate.stage, outcome.seconds, outcome.failure, ask)
            if on_progress is not None:
                on_progress(records[position])

        runner.run([Task(c.config, c.fidelity, stage=c.stage) for c in fresh], done)
        for position in range(len(fresh)):
            evaluation = records[position]
            history.append(evaluation)
            known[(evaluation.config, evaluation.fidelity)] = evaluation.score
        fresh_keys = {(c.config, c.fidelity) for c in fresh}
        for candidate in batch[:asked]:
            key = (candidate.config, candidate.fidelity)
            if key in fresh_keys:
                fresh_keys.discard(key)
                stale = 0
            else:
                hits, stale = hits + 1, stale + 1
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
