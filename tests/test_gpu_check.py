"""benchmarks/gpu_check.py's dry run: every step of the GPU check runs on the CPU with a tiny model, and the
report claims no CUDA figure."""

import json

import pytest
from gpu_check import DRY_RUN, dry_setup, markdown, run_check


@pytest.mark.slow
def test_the_dry_run_takes_every_step_on_the_cpu_and_claims_no_cuda_figure(tmp_path):
    report = run_check(dry_setup(tmp_path), tmp_path)
    rows = report["rows"]
    assert [row["plan"] for row in rows] == [
        "uniform 4-bit r8", "mixed by layer", "mixed by module", "uniform 4-bit r16", "mixed 2/4-bit r8/16"]
    for row in rows:
        assert row["measured_peak_bytes"] is None and "error" not in row and "within_budget" not in row and row["steps"] == []
        assert row["estimate_persistent_bytes"] >= row["measured_persistent_bytes"] > 0  # the harness's CPU count
    assert report["context_bytes"] is None and DRY_RUN in report["device"]
    table = markdown(report)
    assert table.count(DRY_RUN) >= 3 * len(rows)
    json.dumps(report)  # the report is plain JSON
