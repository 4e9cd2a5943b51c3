"""The final pick: a plan is emitted only if it beats the best uniform configuration beyond noise.

The search ranks candidates on one seed (common random numbers: same LoRA initialisation and batch order
for all), which is the right way to compare many candidates cheaply, and the wrong way to declare a
winner: the best of many on one seed is partly the luckiest (the winner's curse). So the best few
finalists and the best uniform configuration are run again, at the top rung, on fresh seeds that took no
part in choosing them, paired by seed: for seed s, d_s = loss(finalist, s) − loss(uniform, s). The paired
mean d̄ and its standard error SE = sd(d)/√n decide: the first finalist, in the order given, with
d̄ < −2·SE is the plan; if there is none, the plan is the uniform configuration, and the compile says so. The plan's predicted
loss is its mean over these seeds, an unbiased estimate of what a user's run gets. A run that failed (its
worker died twice) has an infinite loss; its seed is left out of that finalist's pairing.

Re-runs are spent only where the decision is still open. The finalists are tried one at a time, in the
order given (the search's, its best first; finalists from step 0 in the priors' order: `finalists_of`), and
the first that beats uniform is the plan: the others are not run. A
finalist runs seed by seed, on the next seed only if the paired differences still to come could make it a
winner (`can_still_win`, exact). With the default three seeds and the 2-SE margin, a finalist behind
uniform on the first seed, or level with it, is already lost (the best case, two equal gains after a tie,
sits exactly at 2 SE), so it costs one run, not three. Uniform runs on every seed a finalist runs on (once:
every later finalist pairs with the same uniform runs), and, where no finalist wins, on all but the last
seed in any case: its mean is the prediction when it is the plan. A winning first finalist so costs six
runs with three seeds, not the seven or more of running every finalist on the first seed; testing in turn
and stopping at the first win makes a false win no likelier than testing all of them.
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

    def seeds_of(self, config: Config) -> list[int]:
        """The fresh seeds `config` ran on (a finalist stops at the first seed after which it cannot win)."""
        return list(self.scores[config_key(config)])

    @property
    def predicted(self) -> float:
        """The plan's mean held-out loss over the fresh seeds: an unbiased estimate of a user's run."""
        return self.mean_of(self.config)


def can_still_win(differences: Sequence[float], remaining: int = 1) -> bool:
    """Whether `remaining` more paired differences can make `differences` and them beat the baseline beyond
    MARGIN_SE.

    For a given sum, equal values spread least, so the best case is `remaining` copies of one value x. With j
    known values of sum S and sum of squares Q, k = `remaining` and n = j + k, "mean < −m·SE" is S + k·x < 0
    and g(x) = (n − 1 + m²)(S + k·x)² − m²·n·(Q + k·x²) > 0 (m = MARGIN_SE; g is n(n − 1)(n·mean² − m²·s²)).
    g's x² coefficient is a = k((n − 1)·k − m²·j). If a > 0, or a = 0 and S < 0, a large enough gain wins.
    If a < 0, g is a concave parabola, largest at x* = (n − 1 + m²)·S / (m²·j − (n − 1)·k), where the mean
    has the sign of S; so a win is possible exactly when x* gives one, and that is what is checked."""
    finite = [d for d in differences if math.isfinite(d)]
    if not finite:
        return remaining >= 2
    j, k, total, m2 = len(finite), remaining, sum(finite), MARGIN_SE**2
    n = j + k
    curvature = k * ((n - 1) * k - m2 * j)
    if curvature > 0 or (curvature == 0 and total < 0):
        return True
    if curvature == 0:
        return False
    best = (n - 1 + m2) * total / (m2 * j - (n - 1) * k)
    return paired_difference([*finite, *[best] * k], [0.0] * n).beats_baseline


RunAll = Callable[[Sequence[tuple[Config, int]]], Sequence[float]]


def final_pick(run_all: RunAll, finalists: Sequence[Config], uniform: Config, seeds: Sequence[int]) -> FinalPick:
    """Try the finalists in turn against `uniform` on `seeds`, paired by seed (`run_all` takes many (config,
    seed) at once, so they can run in parallel, and returns their losses in that order): the first that beats
    uniform beyond `MARGIN_SE` standard errors is the plan, else uniform. A finalist runs seed by seed while
    it can still win (`can_still_win`), which changes no decision about it."""
    if len(seeds) < 2:
        raise ValueError(f"the final comparison needs at least two seeds for a paired standard error, got {list(seeds)}")
    candidates = [config for config in dict.fromkeys(finalists) if config != uniform]
    losses: dict[tuple[Config, int], float] = {}
    chosen, lost_early = uniform, set()
    for config in candidates:
        for position, seed in enumerate(seeds):
            differences = [losses[(config, s)] - losses[(uniform, s)] for s in seeds[:position]]
            if not can_still_win(differences, len(seeds) - position):
                lost_early.add(config)
                break
            losses |= _run(run_all, [c for c in (uniform, config) if (c, seed) not in losses], [seed])
        if paired_difference(*_paired(losses, config, uniform, seeds)).beats_baseline:
            chosen = config
            break
    if chosen == uniform:  # uniform's mean over all but the last seed is the prediction
        losses |= _run(run_all, [uniform], [seed for seed in seeds[:-1] if (uniform, seed) not in losses])
    tried = [config for config in candidates if any((config, seed) in losses for seed in seeds)]
    scores = {config_key(config): {seed: losses[(config, seed)] for seed in seeds if (config, seed) in losses}
              for config in (uniform, *tried)}
    differences = {config_key(config): paired_difference(*_paired(losses, config, uniform, seeds)) for config in tried}
    for config in tried:
        difference = differences[config_key(config)]
        log.info("finalist vs uniform over %d seeds: %+.4f ± %.4f%s", difference.seeds, difference.mean, difference.se,
                 " (beats it)" if difference.beats_baseline else " (cannot win: stopped early)" if config in lost_early else "")
    if len(tried) < len(candidates):
        log.info("%d later finalist(s) not run: an earlier one won", len(candidates) - len(tried))
    return FinalPick(chosen, uniform, tuple(seeds), scores, differences)


def _paired(losses: dict[tuple[Config, int], float], config: Config, uniform: Config,
            seeds: Sequence[int]) -> tuple[list[float], list[float]]:
    ran = [seed for seed in seeds if (config, seed) in losses]
    return [losses[(config, seed)] for seed in ran], [losses[(uniform, seed)] for seed in ran]


def _run(run_all: RunAll, configs: Sequence[Config], seeds: Sequence[int]) -> dict[tuple[Config, int], float]:
    runs = [(config, seed) for config in configs for seed in seeds]
    return dict(zip(runs, run_all(runs))) if runs else {}
