"""What a compile reports while it runs, stage by stage, for one progress display.

Stages, in order: `bit screen` (one unit per bit-width checked, `qra.compiler.bitscreen`), `priors` (one
unit per measurement), `search` (one per evaluation), `final comparison` (one per fine-tune of a finalist
or of uniform on a fresh seed). Each report says the stage, how much of it is done, the best score so far
and the uniform baseline's, where known. `CompileClock` turns the reports into an estimate of the time left
for the whole compile.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qra.units import format_seconds


@dataclass(frozen=True)
class StageProgress:
    stage: str
    done: int
    total: int
    best: float | None = None
    uniform: float | None = None
    run_share: float = 0.0
    """The share of a whole fine-tune the unit just done trained: its steps over the top rung's (1 for the
    final comparison's runs, 0 for a measurement without training)."""


@dataclass
class CompileClock:
    """Time left for the whole compile, from the rate of each stage so far (none before the search has
    one). The search is priced by its rate; the final comparison's units, whole fine-tunes, by
    the mean seconds of its runs so far, or before one has run by the shorter runs seen, the priors' rank
    probes' training and the search's trained rungs, scaled to the top rung's steps (rough: a rung's scoring
    and a process's first step do not scale with the steps, a probe's time holds no scoring, and a promoted
    run resumes from its checkpoint); with none of those (priors replayed from their journal, a search at
    step 0 only), the compile's time left is not known until the first whole fine-tune ends. A unit's
    seconds are the time since the previous report, so with parallel workers or on a replayed journal the
    estimate runs low."""

    search_total: int
    final_total: int
    _started: dict[str, float] = field(default_factory=dict)
    _done: dict[str, int] = field(default_factory=dict)
    _totals: dict[str, int] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)
    _whole: list[float] = field(default_factory=list)  # seconds of the final comparison's fine-tunes
    _scaled: list[float] = field(default_factory=list)  # seconds of shorter runs over their share of one

    def update(self, progress: StageProgress, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._started.setdefault(progress.stage, now if progress.done == 0 else self._last)  # its start, or the last stage's end
        if progress.done and progress.run_share > 0:
            seconds = now - self._last
            whole = progress.stage == "final comparison"  # the search's top-rung runs may resume a checkpoint
            (self._whole if whole else self._scaled).append(seconds / progress.run_share)
        self._done[progress.stage], self._totals[progress.stage] = progress.done, progress.total
        self._last = now

    def seconds_left(self, now: float | None = None) -> float | None:
        now = time.perf_counter() if now is None else now
        rates = {stage: (now - self._started[stage]) / done for stage, done in self._done.items() if done}
        known = self._whole or self._scaled
        per_run = sum(known) / len(known) if known else None  # no training timed yet (priors replayed, search at step 0)
        left = 0.0
        stages = (("priors", self._totals.get("priors", 0)), ("search", self.search_total),
                  ("final comparison", self.final_total))
        for position, (stage, total) in enumerate(stages):
            if any(later in self._started for later, _ in stages[position + 1:]):
                continue  # a stage after it has begun: it is over (a search may stop short of its evaluations)
            remaining = self._totals.get(stage, total) - self._done.get(stage, 0)
            rate = rates.get(stage) if stage != "final comparison" else per_run
            if remaining > 0:
                if rate is None:
                    return None
                left += remaining * rate
        return left


def describe(progress: StageProgress, scores: dict[str, float], seconds_left: float | None) -> str:
    """One line of progress: the stage, done/total, the scores known so far and the compile's ETA."""
    parts = [f"{progress.stage}: {progress.done}/{progress.total}"]
    parts += [f"{name} {value:.4f}" for name, value in scores.items()]
    if seconds_left is not None:
        parts.append(f"compile ETA {format_seconds(seconds_left)}")
    return ", ".join(parts)


class StageLines:
    """The progress display for a log or a pipe: one line per stage, written when the stage ends (the next
    one starts, or `close`), with its counts, the scores and the ETA for the rest of the compile."""

    def __init__(self, write: Callable[[str], None], clock: CompileClock) -> None:
        self.write = write
        self.clock = clock
        self.scores: dict[str, float] = {}
        self._last: StageProgress | None = None

    def __call__(self, progress: StageProgress) -> None:
        self.clock.update(progress)
        if progress.done == 0 and self._last is not None and progress.stage != self._last.stage:
            return  # the next stage's start: the last stage's line waits for a rate of it, for the ETA
        if self._last is not None and progress.stage != self._last.stage:
            self._flush()  # before the new stage's scores: the priors' line has none of the search's
        self.scores.update({name: value for name, value in (("best", progress.best), ("uniform", progress.uniform))
                            if value is not None})
        self._last = progress

    def _flush(self) -> None:
        self.write(describe(self._last, self.scores, self.clock.seconds_left()))

    def close(self) -> None:
        if self._last is not None:
            self._flush()
            self._last = None
