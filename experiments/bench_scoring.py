"""Held-out scoring as `qra.runtime.heldout` does it against the earlier, strided way, timed in one run.

    python experiments/bench_scoring.py               # SmolLM2-135M on python-reference+arithmetic, ~2 min

Both score every held-out sequence of the data with the same model (bf16, as the compile's evaluator on a
CPU with native bf16, else fp32):

- before: the output head over every position, then torch's cross-entropy over a [batch, vocab, positions]
  view of the fp32 logits (the class dimension strided), masked to the scored tokens; kept here, and only
  here, as the baseline;
- now: the head over the positions some sequence scores (`logits_to_keep`), the cross-entropy over the
  scored rows only, each contiguous (`qra.runtime.heldout.score_held_out`).

Printed: each way's wall time (best of `--repeats`), its ratio to the baseline, and the largest error of a
sequence's summed loss against a float64 cross-entropy of the whole head's logits. Run it with nothing else on the
machine.
"""

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch.nn import functional

from qra.benchmark import DATA, MODEL
from qra.compiler.fidelity import cast_keeping_fp32_buffers, prepare_data
from qra.models import load_model, resolve_model
from qra.runtime.data import IGNORE_INDEX, load_dataset
from qra.runtime.heldout import HeldOut, score_held_out, sequence_losses
from qra.runtime.precision import fastest_dtype


def strided_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The baseline: every position's logits, cross-entropy over the strided [batch, vocab, positions] view."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    per_token = functional.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (per_token * (targets != IGNORE_INDEX)).double().sum(dim=1)


def float64_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The reference: the same logits, cross-entropy in float64."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    return functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                                    reduction="none").sum(dim=1)


def best_time(score: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        score()
        times.append(time.perf_counter() - began)
    return min(times)


def largest_error(model: torch.nn.Module, held_out: HeldOut,
                  losses: Callable[[torch.nn.Module, dict], torch.Tensor]) -> float:
    with torch.no_grad():
        return max(float((losses(model, batch) - float64_losses(model, batch)).abs().max())
                   for batches in held_out.values() for batch in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = load_model(resolve_model(args.model), "bfloat16")
    model = cast_keeping_fp32_buffers(model, fastest_dtype()).eval()
    held_out = prepare_data(load_dataset(args.data), tokenizer, seq_len=128, batch_size=4).held_out

    def strided_score() -> None:
        with torch.no_grad():
            for batches in held_out.values():
                for batch in batches:
                    strided_losses(model, batch)

    baseline = best_time(strided_score, args.repeats)
    now = best_time(lambda: score_held_out(model, held_out), args.repeats)
    errors = {"before": largest_error(model, held_out, strided_losses),
              "now": largest_error(model, held_out, lambda m, b: sequence_losses(m, b)[0])}
    sequences = sum(len(batch["input_ids"]) for batches in held_out.values() for batch in batches)
    lines = [f"{args.model} ({fastest_dtype()}), {args.data}: {sequences} held-out sequences, best of {args.repeats}",
             "", "| scoring | wall | vs before | largest error of a sequence's loss (nats) |", "|---|---|---|---|",
             f"| before (every position, strided cross-entropy) | {baseline:.1f}s | 1.00 | {errors['before']:.2e} |",
             f"| now (scored positions and rows only) | {now:.1f}s | {now / baseline:.2f} | {errors['now']:.2e} |"]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
