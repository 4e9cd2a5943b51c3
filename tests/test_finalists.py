"""The final pick: paired by seed, a finalist wins only beyond two paired standard errors."""

import math

import pytest

from qra.compiler.finalists import final_pick, paired_difference
from qra.compiler.space import Gene


def each(evaluate):
    """A `run_all` that runs every (config, seed) with `evaluate(config, seed)`."""
    return lambda runs: [evaluate(config, seed) for config, seed in runs]

UNIFORM = (Gene(4, 8), Gene(4, 8))
MIXED = (Gene(8, 8), Gene(3, 8))
OTHER = (Gene(8, 4), Gene(4, 4))


def test_the_paired_difference_is_the_mean_of_per_seed_differences_with_its_standard_error():
    difference = paired_difference([1.0, 2.0, 3.5], [1.5, 2.4, 3.7])
    assert difference.mean == pytest.approx(-0.3667, abs=1e-4)
    # differences -0.5, -0.4, -0.2: sd 0.1528, SE sd/sqrt(3)
    assert difference.se == pytest.approx(0.15275 / math.sqrt(3), abs=1e-4)
    assert difference.beats_baseline
    assert not paired_difference([1.0], [2.0]).beats_baseline  # one seed has no error estimate


def test_a_consistent_small_gain_wins_and_a_large_noisy_one_does_not():
    seeds = (1, 2, 3)
    consistent = {1: -0.05, 2: -0.04, 3: -0.06}
    noisy = {1: -0.4, 2: +0.3, 3: -0.2}
    base = {1: 2.0, 2: 2.1, 3: 1.9}

    def evaluate(config, seed):
        shift = {MIXED: consistent, OTHER: noisy}.get(config, {seed: 0.0})[seed]
        return base[seed] + shift

    pick = final_pick(each(evaluate), [OTHER, MIXED], UNIFORM, seeds)
    assert pick.config == MIXED and not pick.is_uniform
    assert pick.predicted == pytest.approx(2.0 - 0.05)
    assert pick.scores["4:8,4:8"] == base

    only_noisy = final_pick(each(evaluate), [OTHER], UNIFORM, seeds)
    assert only_noisy.is_uniform and only_noisy.predicted == pytest.approx(2.0)


def test_a_uniform_finalist_is_not_compared_with_itself():
    pick = final_pick(each(lambda config, seed: 1.0), [UNIFORM], UNIFORM, (1, 2, 3))
    assert pick.is_uniform and pick.differences == {}


def test_a_failed_run_leaves_its_seed_out_of_the_pairing():
    def evaluate(config, seed):
        if config == MIXED:
            return math.inf if seed == 2 else 1.95 - 0.001 * seed
        return 2.0

    pick = final_pick(each(evaluate), [MIXED], UNIFORM, (1, 2, 3, 4))
    difference = pick.differences["8:8,3:8"]
    assert difference.seeds == 3 and difference.mean == pytest.approx(-0.05 - 0.008 / 3)
    assert pick.config == MIXED and pick.predicted == pytest.approx(1.95 - 0.008 / 3)
    assert not paired_difference([math.inf], [2.0]).beats_baseline
