"""Where candidate runs execute: in this process (the default), or on a Ray cluster (`qra.compiler.ray_pool`).

A `Pool` takes a batch of `Task`s (a configuration's run to one rung of the fidelity ladder, on a seed) and
returns one `Outcome` per task, in the order asked, calling `on_done` as each finishes (in any order). The
search, its journal and the final comparison only ever see a pool, so a new engine is a new file and a
branch in `open_pool`, nowhere else.

A task's score does not depend on where it runs: every run is seeded (same LoRA initialisation and batch
order), and a promoted candidate resumed from a checkpoint ends exactly where a fresh run ends. Floating
point is the one exception: a CPU's matrix products sum in an order that depends on the number of threads,
so scores of the same task on workers with another thread count differ slightly (tests/test_workers.py holds
them within 1e-3 of the in-process scores).
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from qra.compiler.space import Config


@dataclass(frozen=True)
class Task:
    """One candidate run: `config` trained to rung `fidelity` and scored, on `seed` (None: the plan's seed);
    `stage` names the part of the compile that asked for it (the journal records it)."""

    config: Config
    fidelity: int
    seed: int | None = None
    stage: str = "search"


@dataclass(frozen=True)
class Outcome:
    """A task's held-out loss and wall time; a task whose worker died twice has no score, only `failure`."""

    score: float
    seconds: float
    failure: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.failure)

    @staticmethod
    def failed_with(reason: str, seconds: float = 0.0) -> "Outcome":
        return Outcome(math.inf, seconds, reason)


OnDone = Callable[[int, Outcome], None]


class Evaluator(Protocol):
    """What a pool runs tasks on (`qra.compiler.fidelity.FidelityEvaluator`, or any search objective)."""

    def evaluate(self, config: Config, fidelity: int) -> float: ...


class Pool(Protocol):
    def run(self, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        """Every task's outcome, in the order of `tasks`."""

    def close(self) -> None:
        """Release the workers."""


def run_task(evaluator: Evaluator, task: Task) -> Outcome:
    """The task run on `evaluator` (another seed than the plan's needs `evaluate(config, fidelity, seed)`)."""
    started = time.perf_counter()
    if task.seed is None:
        score = evaluator.evaluate(task.config, task.fidelity)
    else:
        score = evaluator.evaluate(task.config, task.fidelity, task.seed)  # type: ignore[call-arg]
    return Outcome(float(score), time.perf_counter() - started)


class InProcessPool:
    """Runs tasks one after another on the compile's own evaluator (an exception stops the compile)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def run(self, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        outcomes = []
        for index, task in enumerate(tasks):
            outcomes.append(run_task(self.evaluator, task))
            if on_done is not None:
                on_done(index, outcomes[-1])
        return outcomes

    def close(self) -> None:
        return None


def open_pool(local: Evaluator, workers: int = 0, address: str | None = None,
              make_evaluator: Callable[[], Evaluator] | None = None, fingerprint: str | None = None) -> Pool:
    """The in-process pool on `local` unless `workers` or a Ray `address` is given; then a Ray pool whose
    workers each build their evaluator with `make_evaluator` and must match `fingerprint` (Ray is imported
    only then)."""
    if workers < 0:
        raise ValueError(f"workers must be 0 (in-process) or more, got {workers}")
    if not workers and address is None:
        return InProcessPool(local)
    if make_evaluator is None:
        raise ValueError("a worker pool needs a way to build each worker's evaluator")
    from qra.compiler.ray_pool import RayPool

    return RayPool(make_evaluator, workers or None, address, fingerprint)
