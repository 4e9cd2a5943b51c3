"""The final pick: a plan is emitted only if it beats the best uniform configuration beyond noise.

The search ranks candidates on one seed (common random numbers: same LoRA initialisation and batch order
for all), which is the right way to compare many candidates cheaply, and the wrong way to declare a
winner: the best of many on one seed is partly the luckiest (the winner's curse). So the best few
finalists and the best uniform configuration are run again, at the top rung, on fresh seeds that took no
part in choosing them, paired by seed: for seed s, d_s = loss(finalist, s) − loss(uniform, s). The paired
mean d̄ and its standard error SE = sd(d)/√n decide: of the finalists with d̄ < −2·SE, the one with the
lowest d̄ is the plan; if there is none, the plan is the uniform configuration, and the compile says so. The plan's predicted
loss is its mean over these seeds, an unbiased estimate of what a user's run gets. A run that failed (its
worker died twice) has an infinite loss; its seed is left out of that finalist's pairing.
"""

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qra.compiler.space import Config, config_key

log = logging.getLogger(__name__)
MARGIN_SE = 2.0  # a win is a paired mean difference beyond this many standard errors


@dataclass(frozen=True)
class PairedDifference:
    """Mean over seeds of candidate − baseline, and its standard error."""

    mean: float
    se: float
    seeds: int

    @property
    def beats_baseline(self) -> bool:
        return self.seeds >= 2 and self.mean < -MARGIN_SE * self.se


def paired_difference(candidate: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """Over the seeds where both runs finished (a failed run's loss is infinite)."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("a paired difference needs one candidate and one baseline score per seed")
    differences = [c - b for c, b in zip(candidate, baseline) if math.isfinite(c) and math.isfinite(b)]
    if not differences:
        return PairedDifference(math.nan, math.nan, 0)
    se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return PairedDifference(statistics.fmean(differences), se, len(differences))


@dataclass(frozen=True)
class FinalPick:
    config: Config
    uniform: Config
    seeds: tuple[int, ...]
    scores: dict[str, dict[int, float]]  # config_key → seed → held-out loss
    differences: dict[str, PairedDifference]  # finalist's config_key → its paired difference against uniform

    @property
    def is_uniform(self) -> bool:
        return self.config == self.uniform

    def mean_of(self, config: Config) -> float:
        """`config`'s mean held-out loss over the fresh seeds (those whose run finished)."""
        finished = [score for score in self.scores[config_key(config)].values() if math.isfinite(score)]
        return statistics.fmean(finished) if finished else math.inf

    @property
    def predicted(self) -> float:
        """The plan's mean held-out loss over the fresh seeds: an unbiased estimate of a user's run."""
        return self.mean_of(self.config)


RunAll = Callable[[Sequence[tuple[Config, int]]], Sequence[float]]


def final_pick(run_all: RunAll, finalists: Sequence[Config], uniform: Config, seeds: Sequence[int]) -> FinalPick:
    """Run every finalist and `uniform` on each of `seeds` (`run_all` takes every (config, seed) at once, so
    they can run in parallel, and returns their losses in that order), pair by seed, and pick, among the
    finalists that beat uniform beyond `MARGIN_SE` standard errors, the one with the lowest mean difference;
    else uniform. (With a few finalists, testing each inflates the chance of a false win a little; the
    finalists are few by design.)"""
    candidates = [config for config in dict.fromkeys(finalists) if config != uniform]
    runs = [(config, seed) for config in (uniform, *candidates) for seed in seeds]
    losses = dict(zip(runs, run_all(runs)))
    scores = {config_key(config): {seed: losses[(config, seed)] for seed in seeds} for config in (uniform, *candidates)}
    baseline = [scores[config_key(uniform)][seed] for seed in seeds]
    differences = {
        config_key(config): paired_difference([scores[config_key(config)][seed] for seed in seeds], baseline)
        for config in candidates
    }
    winners = [config for config in candidates if differences[config_key(config)].beats_baseline]
    chosen = min(winners, key=lambda config: differences[config_key(config)].mean, default=uniform)
    for config in candidates:
        difference = differences[config_key(config)]
        log.info("finalist vs uniform over seeds %s: %+.4f ± %.4f%s", list(seeds), difference.mean, difference.se,
                 " (beats it)" if difference.beats_baseline else "")
    return FinalPick(chosen, uniform, tuple(seeds), scores, differences)
