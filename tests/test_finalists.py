"""The final pick: paired by seed, a finalist wins only beyond two paired standard errors."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qra.compiler.finalists import can_still_win, final_pick, paired_difference
from qra.compiler.space import Gene


def each(evaluate):
    """A `run_all` that runs every (config, seed) with `evaluate(config, seed)`."""
    return lambda runs: [evaluate(config, seed) for config, seed in runs]


def recording(losses):
    """A `run_all` that looks each (config, seed) up in `losses`, and the list of the runs it was asked for."""
    ran = []

    def run_all(runs):
        ran.extend(runs)
        return [losses[config][seed] for config, seed in runs]

    return run_all, ran


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
    # after -0.4 and +0.3 no third seed can make it a win, so seed 3 is not run: uniform's mean is over seeds 1, 2
    assert only_noisy.is_uniform and only_noisy.predicted == pytest.approx(2.05)


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


difference = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)


@given(first=st.lists(difference, min_size=1, max_size=4),
       rest=st.lists(st.floats(min_value=-5.0, max_value=5.0, allow_nan=False), min_size=1, max_size=3))
def test_a_finalist_that_the_seeds_left_could_make_a_winner_is_never_called_lost(first, rest):
    if paired_difference([*first, *rest], [0.0] * (len(first) + len(rest))).beats_baseline:
        assert can_still_win(first, len(rest))


def test_of_three_seeds_a_finalist_behind_or_level_on_the_first_cannot_win_and_one_ahead_can():
    assert not can_still_win([0.01], 2)
    assert not can_still_win([0.0], 2)  # two equal gains after a tie sit exactly at 2 SE
    assert can_still_win([-0.01], 2)
    assert can_still_win([0.5], 3)  # with four seeds, three large equal gains outweigh any first loss


def test_after_two_seeds_a_finalist_behind_uniform_cannot_win_and_one_ahead_can():
    assert not can_still_win([0.01, 0.02])
    assert not can_still_win([-0.05, 0.06])  # ahead on one seed, behind by more on the other
    assert can_still_win([-0.05, -0.04])
    assert not can_still_win([-0.3, 0.1])  # ahead on the mean, but too noisy for any third seed to settle it
    assert can_still_win([-0.3, -0.1])  # a third seed near -0.4 would make it a win


def test_a_finalist_runs_on_the_next_seed_only_while_it_can_still_win():
    losses = {MIXED: {1: 1.95, 2: 2.05, 3: 1.94}, OTHER: {1: 2.1, 2: 2.2, 3: 1.0}, UNIFORM: {1: 2.0, 2: 2.1, 3: 2.0}}
    run_all, ran = recording(losses)

    pick = final_pick(run_all, [OTHER, MIXED], UNIFORM, (1, 2, 3))
    # OTHER lost seed 1 (+0.1): no two seeds can make it a win, so it runs no more; MIXED pairs with the same
    # uniform run on seed 1, and (-0.05 on seeds 1 and 2) could still win, so it and uniform ran seed 3 (-0.06)
    assert ran == [(UNIFORM, 1), (OTHER, 1), (MIXED, 1), (UNIFORM, 2), (MIXED, 2), (UNIFORM, 3), (MIXED, 3)]
    assert pick.scores["8:4,4:4"] == {1: 2.1} and pick.differences["8:4,4:4"].seeds == 1
    assert pick.config == MIXED and pick.differences["8:8,3:8"].seeds == 3

    ran.clear()
    only_losing = final_pick(run_all, [OTHER], UNIFORM, (1, 2, 3))
    # uniform still runs seed 2, for its predicted loss; no one runs seed 3
    assert only_losing.is_uniform and ran == [(UNIFORM, 1), (OTHER, 1), (UNIFORM, 2)]
    assert only_losing.predicted == pytest.approx(2.05)


def test_the_first_finalist_that_wins_is_the_plan_and_the_later_ones_do_not_run():
    losses = {MIXED: {1: 1.95, 2: 2.05, 3: 1.94}, OTHER: {1: 1.8, 2: 1.9, 3: 1.8}, UNIFORM: {1: 2.0, 2: 2.1, 3: 2.0}}
    run_all, ran = recording(losses)

    pick = final_pick(run_all, [MIXED, OTHER], UNIFORM, (1, 2, 3))
    assert pick.config == MIXED and len(ran) == 6 and OTHER not in {config for config, _ in ran}
    assert set(pick.differences) == {"8:8,3:8"} and set(pick.scores) == {"4:8,4:8", "8:8,3:8"}


def test_a_finalist_whose_run_failed_on_a_seed_is_paired_over_the_others_and_the_next_finalist_still_runs():
    losses = {MIXED: {1: 1.95, 2: math.inf, 3: 2.01}, OTHER: {1: 1.90, 2: 2.00, 3: 1.89}, UNIFORM: {1: 2.0, 2: 2.1, 3: 2.0}}
    run_all, ran = recording(losses)

    pick = final_pick(run_all, [MIXED, OTHER], UNIFORM, (1, 2, 3))
    # MIXED: -0.05 and +0.01 over its two finished seeds, not beyond 2 SE; OTHER then pairs with uniform's runs
    assert pick.differences["8:8,3:8"].seeds == 2 and not pick.differences["8:8,3:8"].beats_baseline
    assert pick.config == OTHER and [run for run in ran if run[0] == UNIFORM] == [(UNIFORM, 1), (UNIFORM, 2), (UNIFORM, 3)]


def test_a_final_comparison_on_one_seed_is_refused():
    with pytest.raises(ValueError, match="at least two seeds"):
        final_pick(each(lambda config, seed: 1.0), [MIXED], UNIFORM, (1,))
