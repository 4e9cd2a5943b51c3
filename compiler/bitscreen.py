"""Bit-widths the model cannot use, dropped before the priors measure them.

A bit-width is catastrophic for a model when the model with every unit quantized to it (GPTQ, no training)
predicts the held-out text worse than a uniform guess over its vocabulary: its held-out loss is above
ln(vocabulary size). A LoRA fine-tune of the plan's length does not bring such a model back (on SmolLM2-135M,
uniform 2-bit scores 18.0 nats per token at step 0, ln 49152 = 10.8, and none of the plans benchmarked there
has a 2-bit unit), yet the priors would measure every unit at that width and the search would spend evaluations on it.
Checked from the lowest width up, stopping at the first usable one (a wider one damages less), and never
dropping a width the budget needs (the rest of the space must still fit it). A larger model whose 2-bit GPTQ
perplexity is in the tens (a loss of 3-4 nats) keeps its 2-bit choices.

It costs one held-out pass on the priors' sequences per width checked, and the width's quantization, which
the priors would have run anyway.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from qra.compiler.fidelity import FidelityEvaluator
from qra.compiler.priors import FLOAT_BITS
from qra.compiler.progress import StageProgress
from qra.compiler.space import SearchSpace
from qra.runtime.heldout import HeldOut, score_held_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BitScreen:
    """The space with the catastrophic bit-widths dropped, and each dropped width's uniform held-out loss."""

    space: SearchSpace
    dropped: dict[int, float]
    guess: float  # ln(vocabulary size): the loss of a uniform guess


def uniform_loss(evaluator: FidelityEvaluator, bits: int, held_out: HeldOut) -> float:
    """Held-out loss of the model with every unit's weights at `bits` (GPTQ, no adapter, no training)."""
    space = evaluator.space
    with evaluator.weights.weights(space.settings_for(space.uniform(bits, space.ranks[0]))) as model:
        return score_held_out(model, held_out).mean


def _fits_without(space: SearchSpace, dropped: set[int], budget: int) -> bool:
    kept = tuple(bits for bits in space.bits if bits not in dropped)
    return bool(kept) and space.cost(replace(space, bits=kept).smallest()) <= budget


def screen_bits(evaluator: FidelityEvaluator, held_out: HeldOut, budget: int,
                on_progress: Callable[[StageProgress], None] | None = None) -> BitScreen:
    """Drop the evaluator's bit-widths at which the uniformly quantized model is worse than a uniform guess;
    `on_progress` sees the stage "bit screen", one unit per width checked (out of those below 16 bits),
    and a closing report with the count checked as its total."""
    space = evaluator.space
    guess = math.log(evaluator.model.config.vocab_size)
    dropped: dict[int, float] = {}
    widths = [b for b in space.bits if b < FLOAT_BITS]
    checked = 0
    for bits in widths:
        if not _fits_without(space, {*dropped, bits}, budget):
            break  # the budget needs this width
        if on_progress is not None:
            on_progress(StageProgress("bit screen", checked, len(widths)))
        loss = uniform_loss(evaluator, bits, held_out)
        checked += 1
        if loss <= guess:
            break
        log.info("dropping %d-bit: uniform %d-bit scores %.2f nats per held-out token, worse than a uniform guess "
                 "over the vocabulary (%.2f)", bits, bits, loss, guess)
        dropped[bits] = loss
    if on_progress is not None:
        on_progress(StageProgress("bit screen", checked, checked))
    kept = tuple(bits for bits in space.bits if bits not in dropped)
    return BitScreen(replace(space, bits=kept), dropped, guess)
