"""Which floating dtype computes fastest on this machine's CPU.

bf16 matmuls beat fp32 only where the CPU has native bf16 instructions (avx512_bf16, AMX); on an AVX2-only
CPU, PyTorch falls back to a generic kernel and bf16 runs about 5x slower than fp32 (measured on a 2-core
AMD EPYC: a 512x576 by 576x1536 matmul took 10.5 ms in fp32 and 60.9 ms in bf16). So the choice is measured,
not assumed.
"""

import time

import torch

CANDIDATES = (torch.bfloat16, torch.float32)


def _seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    left = torch.randn(size, size).to(dtype)
    right = torch.randn(size, size).to(dtype)
    left @ right
    began = time.perf_counter()
    for _ in range(repeats):
        left @ right
    return time.perf_counter() - began


def fastest_dtype(candidates: tuple[torch.dtype, ...] = CANDIDATES, size: int = 512, repeats: int = 3) -> torch.dtype:
    """The candidate whose square matmul of `size` runs fastest here; ties go to the earlier candidate."""
    timings = [(_seconds(dtype, size, repeats), index, dtype) for index, dtype in enumerate(candidates)]
    return min(timings)[2]
