"""The compile evaluates in whichever dtype this CPU computes fastest: bf16 only where it is native."""

import torch

from qra.runtime import precision
from qra.runtime.precision import fastest_dtype


def test_the_faster_dtype_wins(monkeypatch):
    monkeypatch.setattr(precision, "_seconds", lambda dtype, size, repeats: {torch.bfloat16: 6.0, torch.float32: 1.0}[dtype])
    assert fastest_dtype() is torch.float32
    monkeypatch.setattr(precision, "_seconds", lambda dtype, size, repeats: {torch.bfloat16: 0.5, torch.float32: 1.0}[dtype])
    assert fastest_dtype() is torch.bfloat16


def test_a_tie_goes_to_the_first_candidate(monkeypatch):
    monkeypatch.setattr(precision, "_seconds", lambda dtype, size, repeats: 1.0)
    assert fastest_dtype((torch.float32, torch.bfloat16)) is torch.float32


def test_on_this_machine_it_times_real_matmuls_and_returns_a_candidate():
    assert fastest_dtype(size=64, repeats=1) in (torch.bfloat16, torch.float32)
