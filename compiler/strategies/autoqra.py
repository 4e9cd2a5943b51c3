"""AutoQRA end to end (arXiv 2602.22268): the layer-wise importance priors (measured beforehand, held by
the problem) warm-start the first stage, the global multi-fidelity evolutionary search screened by a
performance model, which spends about `evolution_share` of the evaluations; the second stage,
trust-region Bayesian optimisation, then refines around the best config, with every top-fidelity
score of the first stage told to its model up front; each of its candidates runs to the top only if it
beats the incumbent one rung below (`TrustRegionBO`'s screen). The feasibility repair operator keeps every
candidate of both stages within the memory budget."""

import logging

from qra.compiler.space import config_key
from qra.compiler.strategies.base import Candidate, Problem, Strategy
from qra.compiler.strategies.evolution import Evolution
from qra.compiler.strategies.trbo import TrustRegionBO

log = logging.getLogger(__name__)


class AutoQRA:
    def __init__(self, problem: Problem, seed: int = 0, evolution_share: float = 0.6, **evolution_settings) -> None:
        self.problem = problem
        self.seed = seed
        self.evolution_share = evolution_share
        self.evolution_settings = evolution_settings

    def start(self, budget_evaluations: int) -> None:
        self.evolution = Evolution(self.problem, self.seed, **self.evolution_settings)
        self.evolution.start(budget_evaluations)
        self.refinement: TrustRegionBO | None = None
        self._budget = budget_evaluations
        self._evolution_budget = round(self.evolution_share * budget_evaluations)
        self._told = 0
        self._phase: Strategy = self.evolution

    def ask(self) -> list[Candidate]:
        if self.refinement is None and self._told >= self._evolution_budget:
            self._phase = self.refinement = self._refinement()
        batch = self._phase.ask()
        if not batch and self.refinement is None:
            self._phase = self.refinement = self._refinement()
            batch = self._phase.ask()
        return batch

    def tell(self, candidate: Candidate, score: float) -> None:
        self._told += 1
        self._phase.tell(candidate, score)

    def _refinement(self) -> TrustRegionBO:
        top = self.problem.top
        ranked = self.evolution.ranked()
        observed = [(i.config, i.scores[top]) for i in ranked if top in i.scores]
        screen = self.problem.fidelities[-2] if len(self.problem.fidelities) > 1 else None
        screened = [(i.config, i.scores[screen]) for i in ranked if screen in i.scores]
        best = ranked[0].config if ranked else None
        log.info("AutoQRA: evolution spent %d evaluations; refining around %s", self._told, config_key(best))
        refinement = TrustRegionBO(self.problem, self.seed + 1, start=best, observed=observed, radius=1,
                                   screen=screen, screened=screened)
        refinement.start(self._budget - self._told)
        return refinement
