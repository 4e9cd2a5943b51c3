"""AutoQRA's second stage: trust-region Bayesian optimisation, refining locally around the incumbent.

Coordinates are the ordinal indices of `Problem.encode` (each unit's bit-width index, then its rank
index). The trust region is a box of half-width `radius` index steps around the incumbent. Each ask
builds a scikit-optimize `Optimizer` (Gaussian process, expected improvement) over the box, tells it
the observations inside the box (the MODEL_POINTS nearest the incumbent), and asks it for one point
(BLAS held to one thread meanwhile: on 2 cores, OpenBLAS threads made these small GP fits ~20x slower,
measured); the point is repaired before scoring, and
its score is recorded both at the asked point (the function skopt models is score after repair) and at
the repaired point. The region grows after `success_tolerance` consecutive improvements of the
incumbent and shrinks after `failure_tolerance` consecutive failures (TuRBO's rule).

With a `screen` fidelity (successive halving inside the region), a new candidate is first scored at that
lower rung, on the same run's checkpoint, and promoted to the top rung (resumed, not restarted) only if it
beats the incumbent's score there; a candidate that does not is a failure of the region and stays out of the
GP, which models top-rung scores only. On SmolLM2 the region's proposals lost to the incumbent at the top
rung by 0.03-0.24 in held-out loss in both benchmark compiles that preceded this rule, each a whole fine-tune
(docs/objective.md, "Screening the refinement"). An incumbent known only at the screen runs to the top rung
with the first challenger that passes it, and not before: where none passes, its top-rung run would decide
nothing (the final comparison runs the finalists again on fresh seeds), and on SmolLM2 it cost most of a
fine-tune.
"""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from skopt import Optimizer
from skopt.space import Integer, Space
from skopt.utils import cook_estimator
from threadpoolctl import threadpool_limits

from qra.compiler.space import Config
from qra.compiler.strategies.base import Candidate, Problem

EXPLORE_DRAWS = 64  # random points of the region tried before settling for an already scored config
MODEL_POINTS = 64  # observations the GP is fitted to (those nearest the incumbent), to bound its cost
IMPROVEMENT = 1e-3  # relative improvement of the incumbent that counts as a success


@dataclass(frozen=True)
class TrustRegion:
    radius: int
    min_radius: int
    max_radius: int
    success_tolerance: int = 1
    failure_tolerance: int = 3
    successes: int = 0
    failures: int = 0

    def update(self, success: bool) -> "TrustRegion":
        """Grow after `success_tolerance` consecutive successes, shrink after `failure_tolerance` failures."""
        if success:
            if self.successes + 1 >= self.success_tolerance:
                return replace(self, radius=min(self.radius + 1, self.max_radius), successes=0, failures=0)
            return replace(self, successes=self.successes + 1, failures=0)
        if self.failures + 1 >= self.failure_tolerance:
            return replace(self, radius=max(self.radius - 1, self.min_radius), successes=0, failures=0)
        return replace(self, successes=0, failures=self.failures + 1)

    def bounds(self, center: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.maximum(center - self.radius, 0), np.minimum(center + self.radius, levels - 1)


class TrustRegionBO:
    def __init__(
        self,
        problem: Problem,
        seed: int = 0,
        start: Config | None = None,
        observed: Sequence[tuple[Config, float]] = (),
        radius: int = 2,
        success_tolerance: int = 1,
        failure_tolerance: int = 3,
        initial_points: int = 4,
        candidates: int = 512,
        stage: str = "trbo",
        screen: int | None = None,
        screened: Sequence[tuple[Config, float]] = (),
    ) -> None:
        """`start` is the first incumbent (default: a random repaired config); `observed` are configs
        already scored at the top fidelity (e.g. by the evolution stage), told to the model up front.
        `screen` is the lower fidelity a new candidate must beat the incumbent at before it runs to the top
        (None: every candidate runs to the top); `screened` are scores at that fidelity known up front."""
        if screen is not None and not 0 <= screen < problem.top:
            raise ValueError(f"the screen fidelity {screen} must be below the top fidelity {problem.top}")
        self.problem = problem
        self.seed = seed
        self.screen, self.screened = screen, tuple(screened)
        self.start_config, self.observed = start, tuple(observed)
        self.radius, self.success_tolerance, self.failure_tolerance = radius, success_tolerance, failure_tolerance
        self.initial_points, self.candidates, self.stage = initial_points, candidates, stage

    def start(self, budget_evaluations: int) -> None:
        self._left = budget_evaluations  # counted down on every tell (a score from memory too: conservative)
        self._rng = np.random.default_rng(self.seed)
        levels = self.problem.levels()
        self.region = TrustRegion(
            radius=min(self.radius, int(levels.max()) - 1), min_radius=1, max_radius=int(levels.max()) - 1,
            success_tolerance=self.success_tolerance, failure_tolerance=self.failure_tolerance,
        )
        self._observations: dict[tuple[int, ...], float] = {}
        self._scored: dict[Config, float] = {}
        self._screen_scores: dict[Config, float] = dict(self.screened)
        self._promoted: Config | None = None  # passed the screen, to run on to the top rung next
        for config, score in self.observed:
            self._observe(config, score)
        start = self.start_config or self.problem.repair(self.problem.random_config(self._rng))
        self.incumbent: Config = start
        self.incumbent_score: float | None = self._scored.get(start)
        self._asked: tuple[int, ...] | None = None

    def ask(self) -> list[Candidate]:
        screening = self._first_fidelity() != self.problem.top
        if self.incumbent_score is None and not screening:
            return [Candidate(self.incumbent, self.problem.top, self.stage)]
        if self._promoted is not None:
            challenger = Candidate(self._promoted, self.problem.top, self.stage)
            if self.incumbent_score is None:  # the incumbent's top-rung run was deferred until a challenger needs it
                # told in this order (the driver's contract), so the incumbent's score is known for the challenger's
                return [Candidate(self.incumbent, self.problem.top, self.stage), challenger]
            return [challenger]
        if screening and self._left < 2 + (self.incumbent_score is None):
            return []  # a screen whose winner could not run on to the top (with the incumbent) changes nothing
        with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skopt warns when it proposes a point it was told before
            point = self._propose()
            config = self.problem.repair(self.problem.decode(np.array(point)))
            if not self._new(config):
                if math.isfinite(self._scored.get(config, math.inf)):
                    self._observations[point] = self._scored[config]
                point, config = self._explore()
        self._asked = point
        return [Candidate(config, self._first_fidelity(), self.stage)]

    def tell(self, candidate: Candidate, score: float) -> None:
        self._left -= 1
        if candidate.fidelity != self.problem.top:
            self._tell_screen(candidate.config, score)
            return
        self._observe(candidate.config, score)
        if self.incumbent_score is None and candidate.config == self.incumbent:
            self.incumbent_score = score
            return
        self._promoted = None
        if self._asked is not None and math.isfinite(score):
            self._observations[self._asked] = score
        self._asked = None
        success = _improves(score, self.incumbent_score)
        if success:
            self.incumbent, self.incumbent_score = candidate.config, score
        self.region = self.region.update(success)

    def _first_fidelity(self) -> int:
        """The screen, where the incumbent's score there is known to compare with; else the top rung."""
        if self.screen is None or self.incumbent not in self._screen_scores:
            return self.problem.top
        return self.screen

    def _tell_screen(self, config: Config, score: float) -> None:
        """Promote a candidate that beats the incumbent at the screen; else count a failure of the region."""
        self._screen_scores[config] = score
        if _improves(score, self._screen_scores[self.incumbent]):
            self._promoted = config
            return
        self._asked = None
        self.region = self.region.update(False)

    def _new(self, config: Config) -> bool:
        """Whether `config` is scored neither at the top rung nor at the screen (the evolution's screened
        configurations and this stage's own, the rejected ones among them)."""
        return config not in self._scored and config not in self._screen_scores

    def _observe(self, config: Config, score: float) -> None:
        self._scored[config] = score
        if math.isfinite(score):  # a failed run is never asked again, and stays out of the GP
            self._observations[tuple(int(v) for v in self.problem.encode(config))] = score

    def _propose(self) -> tuple[int, ...]:
        """One point from a GP-EI optimizer over the trust region, fitted to the observations inside it."""
        center = self.problem.encode(self.incumbent)
        low, high = self.region.bounds(center, self.problem.levels())
        free = np.flatnonzero(high > low)
        point = center.copy()
        if free.size:
            dimensions = [Integer(int(low[i]), int(high[i])) for i in free]
            state = int(self._rng.integers(2**31))
            optimizer = Optimizer(
                dimensions,
                base_estimator=cook_estimator("GP", space=Space(dimensions), random_state=state, noise="gaussian",
                                              n_restarts_optimizer=0),
                n_initial_points=self.initial_points, acq_func="EI", acq_optimizer="sampling",
                acq_optimizer_kwargs={"n_points": self.candidates}, random_state=state,
            )
            inside = self._nearest(center, low, high)
            if inside:
                optimizer.tell([[p[i] for i in free] for p, _ in inside], [s for _, s in inside])
            point[free] = optimizer.ask()
        return tuple(int(v) for v in point)

    def _nearest(self, center: np.ndarray, low: np.ndarray, high: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
        """The observations inside the box, at most MODEL_POINTS of them, nearest the incumbent first."""
        inside = [(p, s) for p, s in self._observations.items() if np.all((low <= p) & (p <= high))]
        inside.sort(key=lambda item: (int(np.abs(np.array(item[0]) - center).sum()), item[0]))
        return inside[:MODEL_POINTS]

    def _explore(self) -> tuple[tuple[int, ...], Config]:
        """When the model proposes a point whose repair was already scored: a random point of the box
        whose repair is new, if one turns up."""
        low, high = self.region.bounds(self.problem.encode(self.incumbent), self.problem.levels())
        for _ in range(EXPLORE_DRAWS):
            point = tuple(int(v) for v in self._rng.integers(low, high + 1))
            config = self.problem.repair(self.problem.decode(np.array(point)))
            if self._new(config):
                break
        return point, config


def _improves(score: float, reference: float) -> bool:
    """Whether `score` beats `reference` by the relative IMPROVEMENT (any finite score beats a failed run)."""
    if not math.isfinite(reference):
        return math.isfinite(score)
    return score < reference - IMPROVEMENT * abs(reference)


class BOOnly(TrustRegionBO):
    """Ablation: trust-region BO alone, from a random repaired start, with flat importance (in repair)."""

    def __init__(self, problem: Problem, seed: int = 0, **settings) -> None:
        super().__init__(problem.flat(), seed, **settings)
