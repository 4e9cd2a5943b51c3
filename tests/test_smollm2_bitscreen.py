"""On the real default model (SmolLM2-135M-Instruct), the bit screen drops 2-bit and keeps 3-bit: the model
quantized to 2 bits everywhere predicts held-out text worse than a uniform guess, at 3 bits it does not.

Slow (loads the GGUF, calibrates and GPTQ-quantizes every layer at 2 and 3 bits, ~2 min): `pytest -m slow`.
"""

import pytest

from qra.compiler.bitscreen import screen_bits
from qra.compiler.compile import CompileRequest, build_evaluator
from qra.plans.schema import Budget, Training

pytestmark = pytest.mark.slow


def test_smollm2_drops_2_bit_and_keeps_3_bit(tmp_path):
    request = CompileRequest(model="smollm2-135m", budget=Budget(bytes=10**12, text="1TB"), data="python-reference+arithmetic",
                             training=Training(seq_len=128, batch_size=4, steps=40), work=tmp_path / "work")
    evaluator = build_evaluator(request)
    screen = screen_bits(evaluator, evaluator.data.held_out_prefix(8), request.budget.bytes)
    assert list(screen.dropped) == [2] and screen.dropped[2] > screen.guess
    assert screen.space.bits == (3, 4, 8)
