"""Handing the heap's free memory back to the operating system (glibc's `malloc_trim`).

PyTorch's CPU tensors come from plain malloc, and a tensor above glibc's mmap threshold (the logits of a
scored batch: hundreds of MB) is mapped fresh, its pages faulted in, on every allocation. After GPTQ has
quantized hundreds of modules (gigabytes allocated and freed in every size, on gptqmodel's worker threads
too), those page faults cost far more kernel time: on SmolLM2 a step-0 evaluation after a cold `prepare`
took 8.3-10.6 s, 6.2-8.3 s of it in the kernel, and 3.6-3.8 s (0.7-0.8 s in the kernel) right after
`malloc_trim(0)`, with as many page faults or more (docs/measurements.md, "Kernel time after GPTQ").
No library does this for a PyTorch CPU process, so it is called here where it matters: after a
measurement's cached weights are swapped back, once the quantization cache drops its calibration, and
after materialize's gptqmodel pass (not measured there).
"""

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim from the C library this process runs on, or None where it has none (macOS, musl)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Return the heap's free pages to the operating system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
