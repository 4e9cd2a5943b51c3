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
    clock.update(StageProgress("search", 1, 10, top_rung=True), now=130.0)
    clock.update(StageProgress("search", 2, 10), now=140.0)
    # search: 2 done in 40 s, 8 left at 20 s; final comparison: 4 runs at the one top-rung run seen, 30 s
    assert clock.seconds_left(now=140.0) == pytest.approx(8 * 20 + 4 * 30)


def test_durations_read_as_hours_minutes_seconds():
    assert [format_seconds(s) for s in (5, 125, 3725)] == ["5s", "2m05s", "1h02m"]


def test_in_a_log_the_progress_is_one_line_per_stage_with_its_counts_and_the_eta():
    lines: list[str] = []
    reports = [StageProgress("priors", done, 3) for done in range(4)]
    reports += [StageProgress("search", 1, 2, best=2.5, top_rung=True), StageProgress("search", 2, 2, best=2.4)]
    reports += [StageProgress("final comparison", done, 2, best=2.4, uniform=2.6, top_rung=True) for done in (1, 2)]
    display = StageLines(lines.append, CompileClock(search_total=2, final_total=2))
    for report in reports:
        display(report)
    display.close()
    assert [line.split(":")[0] for line in lines] == ["priors", "search", "final comparison"]
    assert lines[0].startswith("priors: 3/3") and "compile ETA" in lines[0] and "best" not in lines[0]
    assert lines[1].startswith("search: 2/2, best 2.4000")
    assert lines[2].startswith("final comparison: 2/2, best 2.4000, uniform 2.6000")
