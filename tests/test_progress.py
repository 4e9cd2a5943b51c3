"""The compile's progress: stages reported in order, and an ETA for the whole compile from their rates."""

import pytest

from qra.compiler.progress import CompileClock, StageLines, StageProgress
from qra.units import format_seconds


def test_the_eta_prices_what_is_left_of_every_stage_by_the_rates_seen():
    clock = CompileClock(search_total=10, final_total=4)
    clock.update(StageProgress("priors", 0, 100), now=0.0)
    assert clock.seconds_left(now=0.0) is None  # nothing measured yet
    clock.update(StageProgress("priors", 50, 100), now=50.0)
    assert clock.seconds_left(now=50.0) is None  # the search's cost is not known yet
    clock.update(StageProgress("priors", 100, 100), now=100.0)
    clock.update(StageProgress("search", 1, 10, run_share=1.0), now=130.0)
    clock.update(StageProgress("search", 2, 10), now=140.0)
    # search: 2 done in 40 s, 8 left at 20 s; final comparison: 4 runs at the one top-rung run seen, 30 s
    assert clock.seconds_left(now=140.0) == pytest.approx(8 * 20 + 4 * 30)


def test_before_a_whole_fine_tune_is_seen_the_final_comparison_is_priced_by_the_search_runs_scaled_to_one():
    clock = CompileClock(search_total=3, final_total=4)
    clock.update(StageProgress("priors", 1, 1), now=0.0)
    clock.update(StageProgress("search", 0, 3), now=10.0)
    clock.update(StageProgress("search", 1, 3, run_share=0.0), now=15.0)  # no training: says nothing of a fine-tune
    clock.update(StageProgress("search", 2, 3, run_share=0.25), now=35.0)  # a quarter of the steps in 20 s
    # search: 2 done in 25 s, 1 left at 12.5 s; final comparison: 4 fine-tunes at 20 s / 0.25 = 80 s
    assert clock.seconds_left(now=35.0) == pytest.approx(12.5 + 4 * 80)
    clock.update(StageProgress("search", 3, 3, run_share=0.0), now=40.0)
    clock.update(StageProgress("final comparison", 0, 4), now=40.0)
    clock.update(StageProgress("final comparison", 1, 4, run_share=1.0), now=130.0)
    assert clock.seconds_left(now=130.0) == pytest.approx(3 * 90)  # a whole fine-tune seen: its time


def test_a_search_that_never_trains_leaves_the_final_comparison_priced_by_the_priors_probes():
    clock = CompileClock(search_total=2, final_total=6)
    clock.update(StageProgress("priors", 0, 10), now=0.0)
    clock.update(StageProgress("priors", 9, 10), now=45.0)
    clock.update(StageProgress("priors", 9, 10, run_share=0.15), now=60.0)  # a probe trained 6 of 40 steps in 15 s
    clock.update(StageProgress("priors", 10, 10), now=70.0)
    clock.update(StageProgress("search", 1, 2, run_share=0.0), now=74.0)  # step 0: no training
    # search: 1 left at 4 s; final comparison: 6 fine-tunes at 15 s / 0.15 = 100 s
    assert clock.seconds_left(now=74.0) == pytest.approx(4 + 6 * 100)
    replayed = CompileClock(search_total=2, final_total=6)  # the priors came from their journal: no probe ran
    replayed.update(StageProgress("priors", 10, 10), now=0.0)
    replayed.update(StageProgress("search", 1, 2, run_share=0.0), now=4.0)
    assert replayed.seconds_left(now=4.0) is None  # a step-0 score says nothing of a fine-tune's time
    replayed.update(StageProgress("search", 2, 2, run_share=0.0), now=8.0)
    replayed.update(StageProgress("final comparison", 0, 6), now=8.0)
    replayed.update(StageProgress("final comparison", 1, 6, run_share=1.0), now=68.0)
    assert replayed.seconds_left(now=68.0) == pytest.approx(5 * 60)


def test_a_search_that_stops_short_of_its_evaluations_leaves_nothing_to_wait_for_once_the_next_stage_began():
    clock = CompileClock(search_total=16, final_total=2)
    clock.update(StageProgress("priors", 1, 1), now=0.0)
    clock.update(StageProgress("search", 0, 16), now=0.0)
    clock.update(StageProgress("search", 14, 16, run_share=0.25), now=140.0)  # the strategy stopped at 14
    clock.update(StageProgress("final comparison", 0, 2), now=140.0)
    clock.update(StageProgress("final comparison", 2, 2, run_share=1.0), now=240.0)
    assert clock.seconds_left(now=240.0) == 0


def test_durations_read_as_hours_minutes_seconds():
    assert [format_seconds(s) for s in (5, 125, 3725)] == ["5s", "2m05s", "1h02m"]


def test_in_a_log_the_progress_is_one_line_per_stage_with_its_counts_and_the_eta():
    lines: list[str] = []
    reports = [StageProgress("priors", done, 3) for done in range(4)]
    reports += [StageProgress("search", 0, 2), StageProgress("search", 1, 2, best=2.5, run_share=1.0), StageProgress("search", 2, 2, best=2.4)]
    reports += [StageProgress("final comparison", done, 2, best=2.4, uniform=2.6, run_share=1.0) for done in (1, 2)]
    display = StageLines(lines.append, CompileClock(search_total=2, final_total=2))
    for report in reports:
        display(report)
    display.close()
    assert [line.split(":")[0] for line in lines] == ["priors", "search", "final comparison"]
    assert lines[0].startswith("priors: 3/3") and "compile ETA" in lines[0] and "best" not in lines[0]
    assert lines[1].startswith("search: 2/2, best 2.4000")
    assert lines[2].startswith("final comparison: 2/2, best 2.4000, uniform 2.6000")
