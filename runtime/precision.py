"""Which floating dtype the compile's evaluator computes in on this machine's CPU.

bf16 matmuls beat fp32 only where the CPU has native bf16 instructions (avx512_bf16, AMX); on an AVX2-only
CPU, PyTorch falls back to a generic kernel and bf16 runs about 5x slower than fp32 (measured on a 2-core
AMD EPYC: a 512x576 by 576x1536 matmul took 10.5 ms in fp32 and 60.9 ms in bf16). The choice is read from
the CPU's feature flags, not timed: a timing taken while other jobs share the cores flipped the choice
between two compiles on one machine, and with it every score (the dtype is part of a compile's journal
key, so a resumed compile would then refuse its own journal).
"""

from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags the CPU advertises (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split(":", 1)[1].split())


def fastest_dtype(flags: frozenset[str] | None = None) -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp32."""
    flags = cpu_flags() if flags is None else flags
    return torch.bfloat16 if flags & NATIVE_BF16_FLAGS else torch.float32
