"""qra.runtime.heap: freed heap memory goes back to the operating system where the C library allows it."""

import os

import pytest
import torch

from qra.runtime import heap


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(heap._malloc_trim() is None or not os.path.exists("/proc/self/statm"),
                    reason="glibc's malloc_trim and /proc: Linux with glibc only")
def test_trimming_returns_freed_small_allocations_to_the_operating_system():
    # small tensors live on the heap (below the mmap threshold); freeing every other one leaves holes that
    # glibc keeps until it is asked to trim
    tensors = [torch.ones(16_000) for _ in range(4_000)]
    del tensors[::2]
    before = _resident_bytes()
    assert heap.trim_heap()
    assert _resident_bytes() < before - 50 * 2**20


def test_without_malloc_trim_nothing_is_trimmed_and_nothing_fails(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.trim_heap() is False
