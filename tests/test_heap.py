"""qra.runtime.heap: freed heap memory goes back to the operating system where the C library allows it."""

import sys

import pytest
import torch

from qra.runtime.heap import trim_heap


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_trimming_returns_freed_small_allocations_to_the_operating_system():
    # many small tensors live on the heap (below the mmap threshold); freeing every other one leaves holes
    # that glibc keeps until it is asked to trim
    tensors = [torch.ones(16_000) for _ in range(20_000)]
    del tensors[::2]
    before = _resident_bytes()
    assert trim_heap()
    assert _resident_bytes() < before - 100 * 2**20
