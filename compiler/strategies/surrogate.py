"""The performance model that screens offspring in AutoQRA's evolutionary stage: a random forest on
ordinal gene features (each unit's bit-width and rank index) plus the priors' importance lost, fitted
to the configs scored at one fidelity. Offspring are ranked by an optimistic estimate, mean minus
`optimism` times the spread between trees, so that uncertain regions still get evaluated."""

from collections.abc import Sequence

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from qra.compiler.space import Config
from qra.compiler.strategies.base import Problem

TREES = 64


class Surrogate:
    def __init__(self, problem: Problem, seed: int, optimism: float = 0.5) -> None:
        self.problem = problem
        self.optimism = optimism
        self._forest = RandomForestRegressor(n_estimators=TREES, min_samples_leaf=1, random_state=seed, n_jobs=1)

    def features(self, configs: Sequence[Config]) -> np.ndarray:
        lost = [[self.problem.importance.total_lost(config)] for config in configs]
        return np.hstack([np.array([self.problem.encode(config) for config in configs], dtype=float), np.array(lost)])

    def fit(self, configs: Sequence[Config], scores: Sequence[float]) -> "Surrogate":
        self._forest.fit(self.features(configs), np.asarray(scores, dtype=float))
        return self

    def acquisition(self, configs: Sequence[Config]) -> np.ndarray:
        """Lower is more promising: predicted score minus `optimism` standard deviations."""
        features = self.features(configs)
        per_tree = np.stack([tree.predict(features) for tree in self._forest.estimators_])
        return per_tree.mean(axis=0) - self.optimism * per_tree.std(axis=0)
