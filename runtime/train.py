"""`qra materialize`'s training loop: one `Run` (the plan's schedule) from start to end, scored on the
held-out set before and after, its first step measured, checkpointed to disk so that an interrupted run
resumes to the same result.

The loop knows nothing about where batches come from: `batch_for(step, micro)` returns them, so a
resumed run that asks for the same (step, micro) gets the same data. Checkpoints hold the trainable
tensors, the optimizer and scheduler state, the RNG state and the loss history; each is written to a
temporary folder and renamed, so an interruption never leaves a half-written checkpoint.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from qra.plans.schema import Training
from qra.runtime.data import Batch
from qra.runtime.heldout import HeldOut, Scores
from qra.runtime.measure import MeasuredFootprint
from qra.runtime.run import BatchFor, Run, StepLog

__all__ = ["StepLog", "TrainResult", "train_lora", "train_run"]


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
    scores_after: dict | None = None  # `Scores.to_dict()`: each task's loss with its standard error
    gradient_norms: list[float] = field(default_factory=list)  # each step's, before clipping

    def to_dict(self) -> dict:
        data = asdict(self)
        data["measured"] = self.measured.to_dict() if self.measured else None
        return data


def _losses(scores: Scores | None) -> tuple[dict[str, float] | None, float | None]:
    if scores is None or not scores.by_task:
        return None, None
    return scores.losses(), scores.mean


def train_run(
    run: Run,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    measure: bool = True,
    worst_batch: Batch | None = None,
) -> TrainResult:
    """Train `run` to the end of its schedule. With `resume`, it continues from the checkpoint in
    `checkpoint_dir` and ends where an uninterrupted run with the same seed ends. With `measure`, the first
    step run in this process is measured, and every later one whose batch no measured batch covers; with
    `worst_batch` as well (the data's largest, which a short schedule may never reach), a step on it is
    measured after training without changing the run. `TrainResult.measured` is the largest footprint."""
    if resume and checkpoint_dir is not None:
        run.load(checkpoint_dir)
    start = run.step
    before = run.score() if start == 0 and run.held_out else None
    save = (lambda r: r.save(checkpoint_dir)) if checkpoint_dir is not None else None
    measured = run.train_to(run.training.steps, on_step, measure, on_checkpoint=save, checkpoint_every=checkpoint_every)
    if measure and worst_batch is not None:
        worst = run.measure_batch(worst_batch)
        if measured is None or worst.total_bytes > measured.total_bytes:
            measured = worst
    after = run.score() if run.held_out else None
    before_by_task, before_mean = _losses(before)
    after_by_task, after_mean = _losses(after)
    return TrainResult(
        steps=run.training.steps,
        losses=run.losses,
        held_out_loss_before=before_mean,
        held_out_loss_after=after_mean,
        held_out_by_task_before=before_by_task,
        held_out_by_task_after=after_by_task,
        tokens_per_s=run.tokens_seen / run.train_seconds if run.train_seconds > 0 else 0.0,
        wall_s=run.train_seconds,
        resumed_from=start,
        measured=measured,
        scores_after=after.to_dict() if after is not None and after.by_task else None,
        gradient_norms=run.gradient_norms,
    )


def train_lora(
    model: nn.Module,
    training: Training,
    batch_for: BatchFor,
    held_out: HeldOut | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    measure: bool = True,
) -> TrainResult:
    """Fine-tune the trainable parameters of `model` for `training.steps` optimizer steps (`train_run` on a
    new `Run`); `held_out` maps each task to its held-out batches, scored before (unless resumed) and after."""
    return train_run(Run(model, training, batch_for, held_out), checkpoint_dir, checkpoint_every, resume, on_step, measure)
