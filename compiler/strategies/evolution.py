"""AutoQRA's first stage: global multi-fidelity evolutionary search, its initial population warm-started
from the layer-wise importance priors, its offspring screened by a performance model (the surrogate).

A generation: parents by tournament from the population; uniform crossover; importance-guided or
compensatory mutation; repair of every child; the surrogate screens the offspring so that only the
`screened` most promising are evaluated, at the lowest fidelity; then successive promotion up the
fidelity ladder: the best `keep` fraction of each rung is evaluated at the next fidelity. Individuals
are ranked first by the highest fidelity they reached (promotion is survival), then by their score
there; the population is the best `population` of all individuals scored so far.
"""

import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from qra.compiler.space import Config, Gene
from qra.compiler.strategies.base import Candidate, Problem
from qra.compiler.strategies.baselines import sequential_config
from qra.compiler.strategies.surrogate import Surrogate

log = logging.getLogger(__name__)

ATTEMPTS = 8  # child draws per wanted child before a generation settles for fewer (the space is small)
MIN_TRAIN = 5  # configs scored at a fidelity before the surrogate is fitted to it


@dataclass
class Individual:
    config: Config
    scores: dict[int, float] = field(default_factory=dict)

    @property
    def level(self) -> int:
        """The highest fidelity this individual was scored at."""
        return max(self.scores)

    def rank_key(self) -> tuple[int, float]:
        return -self.level, self.scores[self.level]


def _importance_range(values: list[dict[int, float]], keys: tuple[int, ...]) -> np.ndarray:
    spread = np.array([max(v.get(k, 0.0) for k in keys) - min(v.get(k, 0.0) for k in keys) for v in values])
    return spread + 1e-3 * (spread.mean() + 1e-12)


class Evolution:
    def __init__(
        self,
        problem: Problem,
        seed: int = 0,
        population: int = 8,
        offspring: int = 32,
        screened: int = 6,
        keep: float = 0.5,
        crossover: float = 0.5,
        tournament: int = 2,
        warm_start: bool = True,
        stage: str = "evolution",
    ) -> None:
        self.problem = problem
        self.seed = seed
        self.population_size, self.offspring, self.screened, self.keep = population, offspring, screened, keep
        self.crossover_rate, self.tournament_size = crossover, tournament
        self.warm_start, self.stage = warm_start, stage
        space, importance = problem.space, problem.importance
        # how much a unit's bits (rank) matter by the priors: the mutation weights
        self.bit_weight = _importance_range(list(importance.sensitivity), space.bits)
        self.rank_weight = _importance_range(list(importance.plasticity), space.ranks)
        # every gene's importance lost and bytes, per unit: the warm start's tables
        self._genes = [Gene(b, r) for b in space.bits for r in space.ranks]
        self._lost = np.array([[importance.lost(u, g) for g in self._genes] for u in range(problem.units)])
        self._bytes = np.array([[space.unit_bytes(u, g) for g in self._genes] for u in range(problem.units)],
                               dtype=float)

    def start(self, budget_evaluations: int) -> None:
        self._rng = np.random.default_rng(self.seed)
        self.individuals: dict[Config, Individual] = {}
        self.population: list[Individual] = []
        self.generation = 0
        self.generated = 0  # offspring bred (repaired, new)
        self.screened_in = 0  # offspring the surrogate let through to evaluation
        self._rung: list[Config] = []
        self._level = 0

    # ask/tell: one batch per rung of the fidelity ladder
    def ask(self) -> list[Candidate]:
        fidelities = self.problem.fidelities
        if self._rung and self._level + 1 < len(fidelities):
            self._level += 1
            self._rung = self._promote(self._rung, fidelities[self._level - 1])
        else:
            self._rung, self._level = self._next_generation(), 0
        fidelity = fidelities[self._level]
        return [Candidate(config, fidelity, f"{self.stage}:f{fidelity}") for config in self._rung]

    def tell(self, candidate: Candidate, score: float) -> None:
        individual = self.individuals.setdefault(candidate.config, Individual(candidate.config))
        individual.scores[candidate.fidelity] = score

    def ranked(self) -> list[Individual]:
        """Every individual scored so far, best first."""
        return sorted(self.individuals.values(), key=Individual.rank_key)

    def _promote(self, rung: list[Config], fidelity: int) -> list[Config]:
        """Successive promotion: the best `keep` fraction of a rung moves up one fidelity."""
        scored = [c for c in rung if c in self.individuals and fidelity in self.individuals[c].scores]
        scored.sort(key=lambda c: self.individuals[c].scores[fidelity])
        return scored[: math.ceil(len(scored) * self.keep)]

    def _next_generation(self) -> list[Config]:
        if self.generation == 0:
            rung = self._initial()
        else:
            self.population = self.ranked()[: self.population_size]
            rung = self._screen(self._offspring())
        self.generation += 1
        log.debug("generation %d: %d to evaluate", self.generation, len(rung))
        return rung

    # the initial population
    def _initial(self) -> list[Config]:
        """Warm start: up to half uniform configs (first, for each bit-width that fits, highest first,
        uniform at its largest fitting rank: the QLoRA-style points a mixed plan has to beat), the priors'
        greedy allocation (bits by sensitivity per byte, then the largest uniform rank: `sequential_config`),
        then repaired uniforms; the rest samples from the priors. Without the warm start, random repaired
        configs."""
        configs: list[Config] = []
        if self.warm_start:
            space = self.problem.space
            repaired = (self.problem.repair(space.uniform(b, r)) for b in reversed(space.bits) for r in reversed(space.ranks))
            starts = itertools.chain(self._fitting_uniforms(), [sequential_config(self.problem)], repaired)
            self._extend(configs, starts, self.population_size // 2)
        draw = self._prior_sample if self.warm_start else self._random_config
        self._extend(configs, (self.problem.repair(draw()) for _ in range(ATTEMPTS * self.population_size)),
                     self.population_size)
        return configs

    def _fitting_uniforms(self) -> list[Config]:
        """For each bit-width, highest first, the uniform config at the largest rank that fits, where one does."""
        space, configs = self.problem.space, []
        for bits in reversed(space.bits):
            fitting = [space.uniform(bits, rank) for rank in reversed(space.ranks) if self.problem.fits(space.uniform(bits, rank))]
            configs.extend(fitting[:1])
        return configs

    def _random_config(self) -> Config:
        return self.problem.random_config(self._rng)

    @staticmethod
    def _extend(configs: list[Config], candidates: Iterable[Config], size: int) -> None:
        for config in candidates:
            if len(configs) >= size:
                return
            if config not in configs:
                configs.append(config)

    def _prior_sample(self) -> Config:
        """Warm start from the priors: each unit's gene drawn with probability falling with the importance
        it loses plus λ times its bytes, λ a random price of memory (a Lagrangian relaxation of the budget)."""
        lost_spread = np.ptp(self._lost, axis=1).mean() + 1e-12
        price = lost_spread / (np.ptp(self._bytes, axis=1).mean() + 1e-12) * math.exp(self._rng.uniform(-2.3, 2.3))
        energy = (self._lost + price * self._bytes) / (0.1 * lost_spread)
        chosen = []
        for row in energy:
            weights = np.exp(-(row - row.min()))
            chosen.append(self._genes[self._rng.choice(len(self._genes), p=weights / weights.sum())])
        return tuple(chosen)

    # breeding
    def _offspring(self) -> list[Config]:
        children: list[Config] = []
        seen = set(self.individuals)
        for _ in range(ATTEMPTS * self.offspring):
            if len(children) == self.offspring:
                break
            child = self.problem.repair(self._child())
            if child not in seen:
                seen.add(child)
                children.append(child)
        self.generated += len(children)
        return children

    def _child(self) -> Config:
        first = self._tournament()
        if self._rng.random() < self.crossover_rate:
            mask = self._rng.random(self.problem.units) < 0.5
            second = self._tournament()
            first = tuple(a if m else b for a, b, m in zip(first, second, mask))
        draw = self._rng.random()  # 40% guided, 40% compensatory, 20% a random gene
        if draw < 0.4:
            return self._guided(first)
        if draw < 0.8:
            return self._compensatory(first)
        return self._reset(first)

    def _tournament(self) -> Config:
        picks = self._rng.integers(0, len(self.population), size=self.tournament_size)
        return min((self.population[i] for i in picks), key=Individual.rank_key).config

    def _pick(self, weights: np.ndarray) -> int:
        return int(self._rng.choice(len(weights), p=weights / weights.sum()))

    def _step(self, config: Config, steps: dict[int, int]) -> Config:
        """Move coordinates of `encode(config)` by the given steps, clipped to the space."""
        vector = self.problem.encode(config)
        for coordinate, step in steps.items():
            vector[coordinate] += step
        return self.problem.decode(np.clip(vector, 0, self.problem.levels() - 1))

    def _guided(self, config: Config) -> Config:
        """Importance-guided mutation: for bits (or rank), a unit picked in proportion to its sensitivity
        (plasticity) steps up, and one picked in inverse proportion steps down; repair settles the budget."""
        weights, offset = (self.bit_weight, 0) if self._rng.random() < 0.5 else (self.rank_weight, self.problem.units)
        up, down = self._pick(weights), self._pick(1.0 / weights)
        return self._step(config, {offset + up: 1} if up == down else {offset + up: 1, offset + down: -1})

    def _compensatory(self, config: Config) -> Config:
        """Compensatory mutation: a unit picked in inverse proportion to its sensitivity loses a bit-width
        step, and a unit gains a rank step: the same unit half the time (AutoQRA finds lower-bit layers
        taking higher ranks), otherwise one picked in proportion to its plasticity."""
        down = self._pick(1.0 / self.bit_weight)
        up = down if self._rng.random() < 0.5 else self._pick(self.rank_weight)
        return self._step(config, {down: -1, self.problem.units + up: 1})

    def _reset(self, config: Config) -> Config:
        """Exploration: one unit gets a random gene."""
        unit = int(self._rng.integers(self.problem.units))
        gene = self.problem.random_config(self._rng)[unit]
        return config[:unit] + (gene,) + config[unit + 1 :]

    def _screen(self, children: list[Config]) -> list[Config]:
        """Surrogate screening: only the `screened` children the surrogate rates best are evaluated."""
        training = self._training_set() if len(children) > self.screened else None
        if training is None:
            chosen = children[: self.screened]
        else:
            surrogate = Surrogate(self.problem, seed=self.seed + self.generation).fit(*training)
            order = np.argsort(surrogate.acquisition(children), kind="stable")
            chosen = [children[i] for i in order[: self.screened]]
        self.screened_in += len(chosen)
        return chosen

    def _training_set(self) -> tuple[list[Config], list[float]] | None:
        """The configs scored at the highest fidelity that has at least MIN_TRAIN of them."""
        for fidelity in reversed(self.problem.fidelities):
            scored = [i for i in self.individuals.values() if math.isfinite(i.scores.get(fidelity, math.inf))]
            if len(scored) >= MIN_TRAIN:
                return [i.config for i in scored], [i.scores[fidelity] for i in scored]
        return None


class EvolutionOnly(Evolution):
    """Ablation: evolution without priors: flat importance (in repair, mutation weights and the
    surrogate's feature) and a random initial population."""

    def __init__(self, problem: Problem, seed: int = 0, **settings) -> None:
        super().__init__(problem.flat(), seed, warm_start=False, **settings)
