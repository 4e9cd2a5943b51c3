"""The LoRA fine-tuning loop: AdamW with warmup and cosine decay, gradient accumulation, held-out
evaluation, measured memory on the first step, and checkpoints that resume to the same result.

The loop knows nothing about where batches come from: `batch_for(step, micro)` returns them, so a
resumed run that asks for the same (step, micro) gets the same data. Checkpoints hold the trainable
tensors, the optimizer and scheduler state, the RNG state and the loss history; each is written to a
temporary folder and renamed, so an interruption never leaves a half-written checkpoint.
"""

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from qra.plans.schema import Training
from qra.runtime.measure import MeasuredFootprint, StepMeasurement

Batch = dict[str, torch.Tensor]
_STATE = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
_PROGRESS = "progress.json"


@dataclass
class StepLog:
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    eta_s: float


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    held_out_loss_before: float | None  # the mean over tasks of `held_out_by_task_before`
    held_out_loss_after: float | None
    held_out_by_task_before: dict[str, float] | None
    held_out_by_task_after: dict[str, float] | None
    tokens_per_s: float
    wall_s: float
    resumed_from: int
    measured: MeasuredFootprint | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["measured"] = self.measured.to_dict() if self.measured else None
        return data


def held_out_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean loss per predicted token over the held-out batches."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            if tokens:
                total += float(model(**batch).loss) * tokens
                count += tokens
    model.train(was_training)
    return total / count if count else math.nan


def task_mean_loss(model: nn.Module, tasks: Sequence[Sequence[Batch]]) -> float:
    """The mean over tasks of each task's held-out loss, so that a task with long sequences (packed text)
    does not outweigh one whose loss falls on a few answer tokens."""
    return sum(held_out_loss(model, batches) for batches in tasks) / len(tasks)


def losses_by_task(model: nn.Module, tasks: Mapping[str, Sequence[Batch]]) -> tuple[dict[str, float], float] | tuple[None, None]:
    """Each task's held-out loss and their mean (the score the compiler's plans predict), or Nones
    when there is nothing held out."""
    if not tasks:
        return None, None
    losses = {task: held_out_loss(model, batches) for task, batches in tasks.items()}
    return losses, sum(losses.values()) / len(losses)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, step: int, losses: list[float]) -> None:
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in _trainable(model).items()}, staging / _STATE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
        staging / _OPTIMIZER,
    )
    (staging / _PROGRESS).write_text(json.dumps({"step": step, "losses": losses}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler) -> tuple[int, list[float]]:
    tensors = load_file(folder / _STATE)
    with torch.no_grad():
        for name, parameter in _trainable(model).items():
            parameter.copy_(tensors[name])
    state = torch.load(folder / _OPTIMIZER, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    progress = json.loads((folder / _PROGRESS).read_text())
    return progress["step"], progress["losses"]


def _micro_step(model: nn.Module, batch: Batch, accumulation: int) -> tuple[float, int]:
    loss = model(**batch).loss
    (loss / accumulation).backward()
    return float(loss.detach()), int(batch["input_ids"].numel())


def train_lora(
    model: nn.Module,
    training: Training,
    batch_for: Callable[[int, int], Batch],
    held_out: Mapping[str, Sequence[Batch]] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    measure: bool = True,
) -> TrainResult:
    """Fine-tune the trainable parameters of `model` for `training.steps` optimizer steps.

    `batch_for(step, micro)` gives micro-batch `micro` of optimizer step `step`; `held_out` maps each task
    to its held-out batches, scored before (unless resumed) and after training. With `measure`, the
    first step run in this process is measured (`TrainResult.measured`). With `resume`, training continues from the
    checkpoint in `checkpoint_dir` and ends where an uninterrupted run with the same seed ends.
    """
    torch.manual_seed(training.seed)
    optimizer = torch.optim.AdamW(list(_trainable(model).values()), lr=training.learning_rate, weight_decay=0.0)
    warmup = max(1, training.steps // 10)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, training.steps)
    start, losses = 0, []
    if resume and checkpoint_dir is not None and (checkpoint_dir / _PROGRESS).is_file():
        start, losses = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
    before_by_task, before = losses_by_task(model, held_out or {}) if start == 0 else (None, None)
    model.train()
    measured = None
    must_measure = measure
    began = time.perf_counter()
    tokens_seen = 0
    for step in range(start, training.steps):
        measurement = StepMeasurement(model) if must_measure else None
        must_measure = False
        step_loss = 0.0
        for micro in range(training.grad_accumulation):
            batch = batch_for(step, micro)
            if measurement is not None and micro == 0:
                with measurement.forward():
                    loss = model(**batch).loss
                (loss / training.grad_accumulation).backward()
                loss_value, tokens = float(loss.detach()), int(batch["input_ids"].numel())
            else:
                loss_value, tokens = _micro_step(model, batch, training.grad_accumulation)
            step_loss += loss_value / training.grad_accumulation
            tokens_seen += tokens
        optimizer.step()
        scheduler.step()
        if measurement is not None:
            measured = measurement.finish(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        done = step + 1
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == training.steps):
            _save_checkpoint(checkpoint_dir, model, optimizer, scheduler, done, losses)
        if on_step is not None:
            elapsed = time.perf_counter() - began
            rate = tokens_seen / elapsed if elapsed > 0 else 0.0
            eta = elapsed / (done - start) * (training.steps - done)
            on_step(StepLog(done, training.steps, step_loss, rate, eta))
    wall = time.perf_counter() - began
    after_by_task, after = losses_by_task(model, held_out or {})
    return TrainResult(
        steps=training.steps,
        losses=losses,
        held_out_loss_before=before,
        held_out_loss_after=after,
        held_out_by_task_before=before_by_task,
        held_out_by_task_after=after_by_task,
        tokens_per_s=tokens_seen / wall if wall > 0 else 0.0,
        wall_s=wall,
        resumed_from=start,
        measured=measured,
    )
