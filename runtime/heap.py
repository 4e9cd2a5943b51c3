"""Handing the heap's free memory back to the operating system (glibc's `malloc_trim`).

PyTorch's CPU tensors come from plain malloc, and a tensor above glibc's mmap threshold (the logits of a
scored batch: hundreds of MB) is mapped fresh, its pages faulted in, on every allocation. After GPTQ has
quantized hundreds of modules (gigabytes allocated and freed in every size, on gptqmodel's worker threads
too), those page faults cost far more kernel time: on SmolLM2 a step-0 evaluation after a cold `prepare`
took 8.3-10.6 s, 6-8 s of it in the kernel, and 3.6-3.8 s (0.7-0.8 s in the kernel) right after
`malloc_trim(0)`, with the same number of page faults (docs/measurements.md, "Kernel time after GPTQ").
No library does this for a PyTorch CPU process, so it is called here where it matters: after a
measurement's cached weights are swapped back, once the quantization cache drops its calibration, and
after materialize's gptqmodel pass (not measured there).
"""

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    return getattr(ctypes.CDLL(library), "malloc_trim", None)


def trim_heap() -> bool:
    """Return the heap's free pages to the operating system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
