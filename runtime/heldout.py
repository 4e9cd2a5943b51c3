"""Held-out scoring: each task's loss per predicted token, with its standard error over sequences.

Held-out data has one shape everywhere (`HeldOut`: task name → batches), and one score record
(`Scores`): the compile's fidelity evaluator, `qra materialize` and the quality benchmark all score
through `score_held_out`, so their numbers are the same number.

A task's loss is a ratio, L = Σ_i l_i / Σ_i n_i over its sequences i (l_i: the summed token losses of
sequence i, n_i: its scored tokens). Its standard error is the ratio estimator's (the delta method):
SE² = Σ_i (l_i − L·n_i)² / (m(m−1)·n̄²), m sequences of mean length n̄. Tokens of one sequence are
correlated, so the sequence, not the token, is the independent draw.

The headline score is the mean over tasks of their losses, so that a task with long sequences (packed
text) does not outweigh one whose loss falls on a few answer tokens; its SE is √(Σ SE_t²) / T.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from qra.runtime.data import IGNORE_INDEX, Batch, to_device

HELD_OUT_BATCH_SIZE = 16  # scoring only: no gradients, so larger batches than training's cost little

HeldOut = Mapping[str, Sequence[Batch]]
"""Each task's held-out batches, by task name."""


@dataclass(frozen=True)
class TaskScore:
    loss: float
    se: float
    tokens: int
    sequences: int


@dataclass(frozen=True)
class Scores:
    by_task: dict[str, TaskScore]

    @property
    def mean(self) -> float:
        """The score plans predict and the search minimizes: the mean of the tasks' losses."""
        return sum(score.loss for score in self.by_task.values()) / len(self.by_task)

    @property
    def se(self) -> float:
        return math.sqrt(sum(score.se**2 for score in self.by_task.values())) / len(self.by_task)

    def losses(self) -> dict[str, float]:
        return {task: score.loss for task, score in self.by_task.items()}

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "se": self.se,
            "by_task": {task: vars(score) for task, score in self.by_task.items()},
        }


def scored_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [batch, kept, vocab] at every position whose next token some sequence of `batch` scores,
    and the next tokens there [batch, kept] (IGNORE_INDEX where that sequence does not score it).

    Only those positions go through the output head (`logits_to_keep`): an answer-only task scores a few
    tokens of each sequence, and the head over a 49k vocabulary is most of a small model's forward."""
    batch = to_device(batch, next(model.parameters()).device)
    targets = batch["labels"][:, 1:]
    kept = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_to_keep=kept).logits
    return logits, targets[:, kept]


def sequence_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of `batch`: the summed next-token loss (float64) and the number of scored tokens, on the
    CPU (the batch goes to the model's device)."""
    return token_losses(*scored_logits(model, batch))


def logit_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_losses` from logits [batch, positions, vocab] computed anywhere (torch, or another runtime):
    the summed loss of each position's next token where its label is scored, and the count scored."""
    return token_losses(logits[:, :-1], labels[:, 1:])


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `targets` [batch, positions]: the summed cross-entropy (float64) of its scored targets under
    `logits` [batch, positions, vocab], and how many it scores.

    The cross-entropy runs on the scored rows only, each contiguous over the vocabulary: torch's kernel over
    a [batch, vocab, positions] view (the class dimension strided) was 2x slower on the CPU and summed its
    log-sum-exp with ~20x the float32 error (measured against float64 on SmolLM2's held-out batches)."""
    scored = targets != IGNORE_INDEX
    per_token = torch.zeros(targets.shape, dtype=torch.float64, device=logits.device)
    per_token[scored] = functional.cross_entropy(logits[scored].float(), targets[scored], reduction="none").double()
    return per_token.sum(dim=1).cpu(), scored.sum(dim=1).cpu()


def task_score(sums: torch.Tensor, counts: torch.Tensor) -> TaskScore:
    """The ratio estimate and its delta-method standard error (see the module docstring)."""
    scored = counts > 0
    sums, counts = sums[scored], counts[scored].double()
    sequences, tokens = int(scored.sum()), float(counts.sum())
    if not tokens:
        return TaskScore(math.nan, math.nan, 0, 0)
    loss = float(sums.sum()) / tokens
    if sequences < 2:
        return TaskScore(loss, math.nan, int(tokens), sequences)
    residual = sums - loss * counts
    mean_length = tokens / sequences
    se = math.sqrt(float((residual**2).sum()) / (sequences * (sequences - 1))) / mean_length
    return TaskScore(loss, se, int(tokens), sequences)


def held_out_sums(model: nn.Module, held_out: HeldOut) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each task's per-sequence summed losses and scored-token counts (`sequence_losses` over its batches);
    the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    sums = {}
    with torch.no_grad():
        for task, batches in held_out.items():
            parts = [sequence_losses(model, batch) for batch in batches]
            if parts:
                sums[task] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    model.train(was_training)
    return sums


def score_held_out(model: nn.Module, held_out: HeldOut) -> Scores:
    """Every task's held-out loss and its standard error."""
    return Scores({task: task_score(*parts) for task, parts in held_out_sums(model, held_out).items()})
