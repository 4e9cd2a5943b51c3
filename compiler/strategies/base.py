"""What every strategy shares: the problem it searches, the candidates it asks for, and the protocol.

Strategies work ask/tell: `ask` returns a batch of candidates (config, fidelity), the driver scores
each and `tell`s the score back; the objective knows nothing about the strategy. Every strategy is
deterministic given its seed and the scores it is told (which is what journal replay relies on).
"""

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from qra.compiler.importance import Importance, flat_importance
from qra.compiler.repair import repair
from qra.compiler.space import Config, Gene, SearchSpace


@dataclass(frozen=True)
class Problem:
    """One compile's search problem: the space, the importance priors, the budget in bytes, and the
    fidelity ladder (lowest first; a plan's score is reported at the last, the top fidelity)."""

    space: SearchSpace
    importance: Importance
    budget: int
    fidelities: tuple[int, ...] = (0, 1, 2)
    _repaired: dict[Config, Config] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def top(self) -> int:
        return self.fidelities[-1]

    @property
    def units(self) -> int:
        return len(self.space.units)

    def fits(self, config: Config) -> bool:
        return self.space.cost(config) <= self.budget

    def repair(self, config: Config) -> Config:
        """AutoQRA's feasibility repair operator (`qra.compiler.repair`), memoised: within budget, slack filled."""
        if config not in self._repaired:
            self._repaired[config] = repair(self.space, self.importance, config, self.budget)
        return self._repaired[config]

    def flat(self) -> "Problem":
        """The same problem without measured priors (for the ablations)."""
        space = self.space
        return replace(self, importance=flat_importance(len(space.units), space.bits, space.ranks))

    def levels(self) -> np.ndarray:
        """How many values each coordinate of `encode` takes."""
        return np.array([len(self.space.bits)] * self.units + [len(self.space.ranks)] * self.units)

    def encode(self, config: Config) -> np.ndarray:
        """Ordinal coordinates: every unit's bit-width index, then every unit's rank index."""
        bits = [self.space.bits.index(gene.bits) for gene in config]
        ranks = [self.space.ranks.index(gene.rank) for gene in config]
        return np.array(bits + ranks, dtype=np.int64)

    def decode(self, vector: np.ndarray) -> Config:
        n = self.units
        return tuple(Gene(self.space.bits[int(vector[i])], self.space.ranks[int(vector[n + i])]) for i in range(n))

    def random_config(self, rng: np.random.Generator) -> Config:
        """Uniformly random genes (not yet repaired)."""
        return self.decode(rng.integers(0, self.levels()))


@dataclass(frozen=True)
class Candidate:
    """One evaluation a strategy asks for; `stage` names the search stage that asked (journaled)."""

    config: Config
    fidelity: int
    stage: str


class Strategy(Protocol):
    problem: Problem

    def start(self, budget_evaluations: int) -> None:
        """Reset all state (seeded) for a search of at most `budget_evaluations` evaluations."""

    def ask(self) -> list[Candidate]:
        """The next batch to score; empty when the strategy has nothing left to try."""

    def tell(self, candidate: Candidate, score: float) -> None:
        """The score of one asked candidate; every candidate of a batch is told before the next ask."""
