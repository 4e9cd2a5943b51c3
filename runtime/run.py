"""One candidate pipeline: a `Run` is one LoRA fine-tune of one configuration, observed at checkpoints.

    weights (a `WeightSource`) → LoRA at each module's rank → the plan's schedule → held-out scores

The compile's fidelity evaluator, `qra materialize` and the quality benchmark all open their fine-tunes
here (`open_run`), so the number the search optimizes is the number a user's run is judged by. They
differ only in the weight source: the search swaps cached per-module GPTQ weights into one shared float
model (`qra.compiler.qcache.CachedWeights`), materialize loads gptqmodel's own quantization pass
(`qra.runtime.quantize.GPTQModelWeights`).

Multi-fidelity is one run observed (optuna's report-and-prune, successive halving): `train_to(k)` runs the
plan's own schedule (AdamW, linear warm-up over the first tenth, cosine decay to `training.steps`, gradients
clipped to `training.max_grad_norm`) up to
step k, `score()` reports, and `state()` / `restore()` let a promoted candidate continue from its
checkpoint instead of restarting. A run resumed from a state ends exactly where an uninterrupted one does.

Every run is seeded by `training.seed` alone: the LoRA initialisation, dropout, and (through
`qra.runtime.data.batch_source`) the batch order. Two configurations run with one seed are compared on
common random numbers.
"""

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Protocol

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from qra.files import atomic_folder
from qra.plans.memory import SettingsFor
from qra.plans.schema import ModuleSettings, Training
from qra.plans.spec import LinearSpec, ModelSpec
from qra.runtime.data import Batch, BatchExtent, to_device
from qra.runtime.heldout import HeldOut, Scores, score_held_out
from qra.runtime.lora import attach_lora
from qra.runtime.lora_init import Decomposition, initialize_adapters
from qra.runtime.measure import MeasuredFootprint, StepMeasurement

BatchFor = Callable[[int, int], Batch]
_STATE = "trainable.safetensors"
_OPTIMIZER = "optimizer.pt"
_PROGRESS = "progress.json"


class WeightSource(Protocol):
    """Where a run's frozen base weights come from, at each module's planned bits, and what a non-zero adapter
    init starts from."""

    def weights(self, settings_for: SettingsFor) -> ContextManager[nn.Module]:
        """The base model with every decoder linear at its settings' bits, for the duration of the context."""

    def decomposition(self, layer: int, module: LinearSpec, settings: ModuleSettings) -> Decomposition:
        """The correction of `module`'s quantization error that its `settings.lora_init` asks for, for the weights
        the open `weights` context holds (asked only inside it, and only for a non-zero init)."""


@dataclass
class StepLog:
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    eta_s: float


@dataclass
class RunState:
    """Everything a run resumes from: the trainable tensors, optimizer and scheduler state, the RNG, and the
    training losses and gradient norms so far."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: torch.Tensor
    losses: list[float] = field(default_factory=list)
    gradient_norms: list[float] = field(default_factory=list)


def warmup_steps(training: Training) -> int:
    return max(1, training.steps // 10)


class Run:
    """A fine-tune of `model`'s trainable parameters under `training`'s schedule."""

    def __init__(self, model: nn.Module, training: Training, batch_for: BatchFor, held_out: HeldOut | None = None) -> None:
        torch.manual_seed(training.seed)
        self.model = model
        self.training = training
        self.batch_for = batch_for
        self.held_out = held_out or {}
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=training.learning_rate, weight_decay=0.0)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps(training), training.steps)
        self.step = 0
        self.losses: list[float] = []
        self.gradient_norms: list[float] = []  # each step's global gradient norm, before clipping
        self.tokens_seen = 0
        self.train_seconds = 0.0

    def train_to(
        self, until: int, on_step: Callable[[StepLog], None] | None = None, measure: bool = False,
        on_checkpoint: Callable[["Run"], None] | None = None, checkpoint_every: int = 0,
    ) -> MeasuredFootprint | None:
        """Optimizer steps from the current step up to `until` (at most `training.steps`). With `measure`, the
        first of them is measured, and so is every later one whose batch no measured batch covers (`BatchExtent`:
        as many tokens or more, and padded if it is); the largest footprint is returned, since the peak is over
        all steps. `on_checkpoint` is called every `checkpoint_every` steps and at the end."""
        until = min(until, self.training.steps)
        measured: MeasuredFootprint | None = None
        extents: list[BatchExtent] = []
        first = self.step
        began = time.perf_counter()
        self.model.train()
        while self.step < until:
            extent = BatchExtent.of(self.batch_for(self.step, 0)) if measure else None
            covered = extent is None or any(seen.covers(extent) for seen in extents)
            measurement = StepMeasurement(self.model) if not covered else None
            loss = self._optimizer_step(measurement)
            if measurement is not None:
                extents.append(extent)
                footprint = measurement.finish(self.optimizer)
                if measured is None or footprint.total_bytes > measured.total_bytes:
                    measured = footprint
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss)
            self.step += 1
            if on_checkpoint is not None and (self.step == until or (checkpoint_every and self.step % checkpoint_every == 0)):
                on_checkpoint(self)
            if on_step is not None:
                elapsed = time.perf_counter() - began
                eta = elapsed / (self.step - first) * (self.training.steps - self.step)
                on_step(StepLog(self.step, self.training.steps, loss, self.tokens_seen / max(self.train_seconds + elapsed, 1e-9), eta))
        self.train_seconds += time.perf_counter() - began
        return measured

    def _optimizer_step(self, measurement: StepMeasurement | None) -> float:
        accumulation = self.training.grad_accumulation
        step_loss = 0.0
        device = next(self.model.parameters()).device
        for micro in range(accumulation):
            batch = to_device(self.batch_for(self.step, micro), device)
            with measurement.forward() if measurement is not None and micro == 0 else contextlib.nullcontext():
                loss = self.model(**batch).loss
            (loss / accumulation).backward()
            step_loss += float(loss.detach()) / accumulation
            self.tokens_seen += int(batch["input_ids"].numel())
        gradients = [p.grad for p in self.trainable.values() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients)
        self.gradient_norms.append(float(norm))
        if self.training.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(list(self.trainable.values()), self.training.max_grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        return step_loss

    def measure_batch(self, batch: Batch) -> MeasuredFootprint:
        """The footprint of a training step on `batch`, taken after the run has stepped (so that the optimizer's
        state exists): a forward and backward under measurement, no optimizer step, the gradients dropped and
        the random state restored, so the run goes on as if it had not been taken."""
        rng = torch.get_rng_state()
        measurement = StepMeasurement(self.model)
        self.model.train()
        with measurement.forward():
            loss = self.model(**to_device(batch, next(self.model.parameters()).device)).loss
        loss.backward()
        footprint = measurement.finish(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        return footprint

    def score(self) -> Scores:
        """Held-out loss of every task (with its standard error) at the current step."""
        return score_held_out(self.model, self.held_out)

    # checkpoints: in memory (the search) and on disk (materialize)
    def state(self) -> RunState:
        return RunState(
            step=self.step,
            trainable={name: p.detach().clone() for name, p in self.trainable.items()},
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            scheduler=copy.deepcopy(self.scheduler.state_dict()),
            rng=torch.get_rng_state(),
            losses=list(self.losses),
            gradient_norms=list(self.gradient_norms),
        )

    def restore(self, state: RunState) -> None:
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(state.trainable[name])
        self.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        self.scheduler.load_state_dict(copy.deepcopy(state.scheduler))
        torch.set_rng_state(state.rng)
        self.step, self.losses, self.gradient_norms = state.step, list(state.losses), list(state.gradient_norms)

    def save(self, folder: Path) -> None:
        """The run's state on disk, written to a staging folder and renamed (never half-written)."""
        state = self.state()
        with atomic_folder(folder) as staging:
            save_file({n: t.contiguous() for n, t in state.trainable.items()}, staging / _STATE)
            torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "rng": state.rng}, staging / _OPTIMIZER)
            (staging / _PROGRESS).write_text(json.dumps({"step": state.step, "losses": state.losses,
                                                    "gradient_norms": state.gradient_norms}))

    def load(self, folder: Path) -> bool:
        """Restore the state saved in `folder`, if there is one."""
        if not (folder / _PROGRESS).is_file():
            return False
        rest = torch.load(folder / _OPTIMIZER, weights_only=False)
        progress = json.loads((folder / _PROGRESS).read_text())
        self.restore(RunState(progress["step"], load_file(folder / _STATE), rest["optimizer"], rest["scheduler"],
                              rest["rng"], progress["losses"], progress.get("gradient_norms", [])))
        return True


@contextlib.contextmanager
def open_run(
    weights: WeightSource,
    spec: ModelSpec,
    settings_for: SettingsFor,
    training: Training,
    batch_for: BatchFor,
    held_out: HeldOut | None = None,
) -> Iterator[Run]:
    """A run of one configuration: the weight source's base, LoRA attached at each module's rank (seeded by
    `training.seed`) and started where each module's `lora_init` says, the schedule ready to train. On exit the
    adapter is removed with peft's `unload()` and the base is as it was (the search reuses one base model for
    every candidate)."""
    with weights.weights(settings_for) as base:
        requires_grad = [(parameter, parameter.requires_grad) for parameter in base.parameters()]
        checkpointing = training.gradient_checkpointing and not base.is_activation_checkpointing
        if checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        torch.manual_seed(training.seed)
        peft_model: PeftModel = attach_lora(base, spec, settings_for, dropout=training.lora_dropout)
        try:
            initialize_adapters(peft_model, spec, settings_for, weights.decomposition)
            yield Run(peft_model, training, batch_for, held_out)
        finally:
            peft_model.unload()
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)
            if checkpointing:
                base.gradient_checkpointing_disable()
                base.disable_input_require_grads()
