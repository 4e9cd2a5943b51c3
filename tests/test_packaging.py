"""Installed, qra lives under one namespace: no bare `compiler`, `runtime` or `plans` in site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_qra_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("qra-*.whl"))
    top_level = {Path(name).parts[0] for name in zipfile.ZipFile(wheel).namelist()}
    packages = {name for name in top_level if not name.endswith(".dist-info")}
    assert packages == {"qra"}
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("qra/plans/memory.py", "qra/compiler/__init__.py", "qra/runtime/measure.py", "qra/runtime/package/onnx.py", "qra/compiler/strategies/trbo.py", "qra/cli.py", "qra/configs/llama-3-8b.json"):
        assert module in names
    shipped = [f"qra/plans/{plan.name}" for plan in (ROOT / "plans").glob("*.yaml")]
    assert shipped and set(shipped) <= set(names)
