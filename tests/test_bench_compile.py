"""benchmarks/bench_compile.py: stage times come from the compile's own progress reports, the table states the
ratio to one fine-tune and the target, and a whole (tiny) measurement runs from a cold start."""

from argparse import Namespace

import pytest
from bench_compile import StageTimes, markdown, measure

from qra.compiler.progress import StageProgress
from qra.testing import save_tiny_model, tiny_corpus


def test_a_stage_runs_from_its_first_report_to_the_next_stages_first():
    times = StageTimes(began=0.0)
    for stage, at in (("priors", 5.0), ("priors", 9.0), ("search", 20.0), ("search", 30.0), ("final comparison", 50.0)):
        times.starts.setdefault(stage, at)
        if stage not in times.order:
            times.order.append(stage)
    assert times.seconds(ended=80.0) == {"load and calibrate": 5.0, "priors": 15.0, "search": 30.0, "final comparison": 30.0}


def test_the_table_gives_each_stage_in_fine_tunes_and_says_whether_the_target_is_met():
    result = {"model": "m", "data": "d", "budget": "1MB", "effort": "quick", "granularity": "module", "schedule": "s",
              "stages_s": {"load and calibrate": 10.0, "priors": 200.0, "search": 300.0, "final comparison": 90.0},
              "compile_s": 600.0, "fine_tune_s": 30.0, "ratio": 20.0, "target": 10}
    text = markdown(result)
    assert "| priors | 3m20s | 6.7x |" in text and "**20.0x**" in text
    assert "Target: at most 10x one fine-tune: missed by 10.0 fine-tunes." in text


def test_stage_times_record_each_stage_once_in_order():
    times = StageTimes()
    for stage in ("priors", "priors", "search", "final comparison", "final comparison"):
        times(StageProgress(stage, 1, 2))
    assert times.order == ["priors", "search", "final comparison"]


@pytest.mark.slow
def test_a_tiny_compile_is_measured_from_cold_against_one_fine_tune_of_its_plan(tmp_path):
    tiny_corpus(tmp_path / "corpus.jsonl")
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    args = Namespace(out=tmp_path / "out", model=str(model), data=str(tmp_path / "corpus.jsonl"), effort="quick",
                     granularity="layer", bits=[2, 4, 8], ranks=[4, 16], seq_len=24, batch_size=2, steps=4, learning_rate=5e-3,
                     fine_tunes=2, workers=0)
    args.out.mkdir()
    result = measure(args)
    assert list(result["stages_s"]) == ["load and calibrate", "bit screen", "priors", "search", "final comparison"]
    assert result["compile_s"] >= sum(result["stages_s"].values()) - 1 and result["fine_tune_s"] > 0
    assert result["ratio"] == pytest.approx(result["compile_s"] / result["fine_tune_s"], rel=0.05)
    # the baseline: the plan's own runs in the final comparison (one per fresh seed it ran on) and the two after
    runs = result["final_runs_s"] + result["fine_tunes_s"]
    assert len(result["fine_tunes_s"]) == 2 and 2 <= len(result["final_runs_s"]) <= 3
    assert result["fine_tune_s"] == pytest.approx(sum(runs) / len(runs))
    assert f"mean of {len(runs)}: its {len(result['final_runs_s'])} run(s) in the final comparison" in markdown(result)


@pytest.mark.slow
def test_with_workers_the_baseline_is_the_fine_tunes_after_the_compile_in_this_process(tmp_path):
    pytest.importorskip("ray")
    tiny_corpus(tmp_path / "corpus.jsonl")
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    args = Namespace(out=tmp_path / "out", model=str(model), data=str(tmp_path / "corpus.jsonl"), effort="quick",
                     granularity="layer", bits=[4, 8], ranks=[4, 16], seq_len=24, batch_size=2, steps=4, learning_rate=5e-3,
                     fine_tunes=1, workers=2)
    args.out.mkdir()
    result = measure(args)
    # the plan's runs in the final comparison ran on a worker, beside another run, on one thread: not counted
    assert result["workers"] == 2 and result["final_runs_s"] == []
    assert result["fine_tune_s"] == pytest.approx(result["fine_tunes_s"][0])
    assert "candidates on 2 Ray worker(s) (`--workers 2`)" in markdown(result)
