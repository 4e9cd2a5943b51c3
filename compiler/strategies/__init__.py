"""Search strategies (README, "The search"), ask/tell, deterministic given a seed, and their driver.

| name | strategy |
|---|---|
| `autoqra` | priors → multi-fidelity surrogate-screened evolution → trust-region BO (`AutoQRA`) |
| `random` | random repaired configs at the top fidelity (`RandomSearch`) |
| `bo` | trust-region BO alone, flat importance, random start (`BOOnly`) |
| `evolution` | evolution alone, flat importance, no warm start (`EvolutionOnly`) |

The deterministic baselines (`uniform`, `sequential`, `heuristic`) are in `BASELINES`; `Baseline(problem,
name)` runs one through the same driver.
"""

from collections.abc import Callable

from qra.compiler.strategies.autoqra import AutoQRA
from qra.compiler.strategies.base import Candidate, Problem, Strategy
from qra.compiler.strategies.baselines import BASELINES, Baseline, heuristic_config, sequential_config, uniform_config
from qra.compiler.strategies.driver import Evaluation, SearchResult, run_search
from qra.compiler.strategies.evolution import Evolution, EvolutionOnly
from qra.compiler.strategies.random_search import RandomSearch
from qra.compiler.strategies.trbo import BOOnly, TrustRegion, TrustRegionBO

STRATEGIES: dict[str, Callable[[Problem, int], Strategy]] = {
    "autoqra": AutoQRA,
    "random": RandomSearch,
    "bo": BOOnly,
    "evolution": EvolutionOnly,
}

__all__ = [
    "AutoQRA", "BASELINES", "BOOnly", "Baseline", "Candidate", "Evaluation", "Evolution", "EvolutionOnly", "Problem",
    "RandomSearch", "STRATEGIES", "SearchResult", "Strategy", "TrustRegion", "TrustRegionBO", "heuristic_config",
    "run_search", "sequential_config", "uniform_config",
]
