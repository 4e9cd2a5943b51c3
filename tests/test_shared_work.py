"""A `--work` folder shared between compiles, as real processes use it: damaged quantization cache entries
are rebuilt (the compile ends at the plan a clean cache gives), and two compiles started together both
finish, the priors journal holding every measurement."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qra.compiler.space import build_space
from qra.compiler.compile import budget_bounds
from qra.plans.io import load_plan
from qra.plans.schema import Device, Training
from qra.testing import save_tiny_model, tiny_corpus, tiny_spec

QRA = shutil.which("qra", path=str(Path(sys.executable).parent)) or shutil.which("qra")
BITS, RANKS = (2, 4, 8), (4, 16)
TRAINING = Training(seq_len=24, batch_size=2, steps=4, learning_rate=5e-3)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_corpus(folder / "corpus.jsonl")
    return save_tiny_model(folder / "model", "llama", layers=2)


def budget(share: float) -> int:
    """A budget `share` of the way from the smallest to the largest footprint of the space."""
    low, high = budget_bounds(build_space(tiny_spec("llama", layers=2), BITS, RANKS, TRAINING, Device(kind="cpu", context_bytes=0)))
    return int(low + share * (high - low))


def compile_command(folder: Path, work: Path, plan: Path, share: float = 0.5) -> list[str]:
    if QRA is None:
        pytest.skip("the qra script is not installed")
    return [
        QRA, "compile", "--model", str(folder), "--budget", str(budget(share)), "-o", str(plan),
        "--data", str(folder.parent / "corpus.jsonl"), "--work", str(work), "--bits", "2,4,8", "--ranks", "4,16",
        "--seq-len", "24", "--batch-size", "2", "--steps", "4", "--learning-rate", "5e-3", "--device", "cpu", "--context", "0", "--granularity", "layer",
    ]


def compile_plan(folder: Path, work: Path, plan: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(compile_command(folder, work, plan), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_damaged_cache_entries_are_rebuilt_and_the_compile_ends_at_the_clean_caches_plan(tiny_folder, tmp_path):
    work = tmp_path / "work"
    compile_plan(tiny_folder, work, tmp_path / "clean.yaml")
    clean = load_plan(tmp_path / "clean.yaml")
    entries = sorted((work / "qcache").rglob("*.safetensors"))
    truncated, flipped = entries[0], entries[len(entries) // 2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0x01  # inside the tensor's bytes: only the stored checksum can tell
    flipped.write_bytes(bytes(data))

    result = compile_plan(tiny_folder, work, tmp_path / "again.yaml")
    assert f"{truncated.name} is removed and rebuilt" in result.stderr
    assert f"{flipped.name} is removed and rebuilt" in result.stderr
    assert "Traceback" not in result.stderr
    assert load_plan(tmp_path / "again.yaml").layers == clean.layers


def test_two_compiles_started_together_on_one_work_folder_both_finish_and_keep_every_measurement(tiny_folder, tmp_path):
    work = tmp_path / "work"
    plans = [tmp_path / "low.yaml", tmp_path / "high.yaml"]
    processes = [
        subprocess.Popen(compile_command(tiny_folder, work, plan, share), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for plan, share in zip(plans, (0.3, 0.7))
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert all(plan.is_file() for plan in plans)
    journals = list((work / "priors").glob("*.json"))
    assert len(journals) == 1  # one model, data and settings: one journal, shared
    entries = json.loads(journals[0].read_text())["entries"]
    layers = 2
    assert len(entries) == 1 + layers * len(BITS) + layers * len(RANKS)  # base, sensitivities, plasticities
