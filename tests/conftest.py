import os
import sys
from pathlib import Path

# gptqmodel torch.compiles its dequantize kernel on first use; on 2 CPU cores compiling costs a minute
# per test module and buys nothing for tiny models.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Tests import each other's helpers (tests/) and the scripts they test (benchmarks/, experiments/) by module
# name: `from bench_quality import markdown`.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT / "experiments")]
