"""Random search (a baseline in the paper's comparison): uniformly random genes, repaired, scored at
the top fidelity. A baseline without priors: it repairs with flat importance (with the measured priors,
the repair operator alone is a greedy search by the priors)."""

import numpy as np

from qra.compiler.space import Config
from qra.compiler.strategies.base import Candidate, Problem

DRAWS = 32  # draws per ask before settling for an already-scored config


class RandomSearch:
    def __init__(self, problem: Problem, seed: int = 0) -> None:
        self.problem = problem.flat()
        self.seed = seed

    def start(self, budget_evaluations: int) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._scored: set[Config] = set()

    def ask(self) -> list[Candidate]:
        for _ in range(DRAWS):
            config = self.problem.repair(self.problem.random_config(self._rng))
            if config not in self._scored:
                break
        return [Candidate(config, self.problem.top, "random")]

    def tell(self, candidate: Candidate, score: float) -> None:
        self._scored.add(candidate.config)
