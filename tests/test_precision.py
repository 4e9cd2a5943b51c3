"""The compile evaluates in bf16 only where the CPU computes it natively, decided by its flags, not a timing."""

import torch

from qra.runtime.precision import cpu_flags, fastest_dtype


def test_bf16_only_with_native_bf16_instructions():
    assert fastest_dtype(frozenset({"avx2", "fma"})) is torch.float32
    assert fastest_dtype(frozenset({"avx2", "avx512f", "avx512_bf16"})) is torch.bfloat16
    assert fastest_dtype(frozenset({"amx_bf16"})) is torch.bfloat16


def test_the_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
