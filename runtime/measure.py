"""Measure the real footprint of a training step, the check that keeps the memory model honest.

On any device, parameters, gradients and optimizer state are counted exactly from the tensors.
Activations saved for backward are counted through `torch.autograd.graph.saved_tensors_hooks`, by
unique storage (a tensor saved by three ops, or a view of a larger buffer, costs its storage once).
With gradient checkpointing the hooks see what the graph keeps between layers (each layer's input);
the one layer recomputed during backward is a transient they cannot see. On CUDA,
`torch.cuda.max_memory_allocated` gives the allocator's true peak as well.

Saved tensors are also sorted by shape: any saved tensor shaped like a linear module's weight is
reported as `saved_weight_like_bytes`, which exposes backends that keep dequantized weights for
backward (gptqmodel's TORCH layers do: see docs/measurements.md).
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from qra.plans.memory import SettingsFor
    from qra.plans.schema import Training
    from qra.plans.spec import ModelSpec


@dataclass
class MeasuredFootprint:
    """Bytes held during one optimizer step, by component (the names match the memory model's)."""

    frozen_bytes: int = 0
    trainable_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    saved_activation_bytes: int = 0
    saved_weight_like_bytes: int = 0
    cuda_peak_bytes: int | None = None
    saved_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Everything counted on any device: state plus what the graph keeps for backward."""
        return (
            self.frozen_bytes
            + self.trainable_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.saved_activation_bytes
        )

    def to_dict(self) -> dict[str, int | None | dict[str, int]]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr())


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


class SavedTensorLedger:
    """Collects the unique storages autograd saves for backward while it is active.

    `exclude` holds storages that are already counted elsewhere (parameters, buffers).
    """

    def __init__(self, exclude: Iterable[torch.Tensor], weight_shapes: set[tuple[int, int]]) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._weight_shapes = weight_shapes
        self._seen: dict[tuple[str, int], int] = {}
        self.weight_like_bytes = 0
        self.by_dtype: dict[str, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return tensor
        key = _storage_key(tensor)
        if key in self._excluded or key in self._seen:
            return tensor
        size = _storage_bytes(tensor)
        self._seen[key] = size
        dtype = str(tensor.dtype).removeprefix("torch.")
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + size
        if tensor.dim() == 2 and not tensor.requires_grad and tuple(tensor.shape) in self._weight_shapes:
            self.weight_like_bytes += size
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total_bytes(self) -> int:
        return sum(self._seen.values())

    @contextmanager
    def active(self) -> Iterator["SavedTensorLedger"]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def linear_weight_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """Shapes [out, in] and [in, out] of every linear-like module (quantized ones included)."""
    shapes: set[tuple[int, int]] = set()
    for module in model.modules():
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if isinstance(in_features, int) and isinstance(out_features, int):
            shapes.add((out_features, in_features))
            shapes.add((in_features, out_features))
    return shapes


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        seen.setdefault(_storage_key(tensor), _storage_bytes(tensor))
    return sum(seen.values())


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return _tensor_bytes(tensors)


class StepMeasurement:
    """Measures one training step taken by the caller: run its forward inside `forward()`, then call
    `finish(optimizer)` after the optimizer step (whose state exists only from its first step on)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        parameters = list(model.parameters())
        buffers = list(model.buffers())
        self._ledger = SavedTensorLedger(exclude=parameters + buffers, weight_shapes=linear_weight_shapes(model))
        self._cuda = any(p.is_cuda for p in parameters)
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()

    def forward(self) -> AbstractContextManager[SavedTensorLedger]:
        """Context for the forward pass: everything autograd saves inside it is counted."""
        return self._ledger.active()

    def finish(self, optimizer: torch.optim.Optimizer) -> MeasuredFootprint:
        parameters = list(self._model.parameters())
        trainable = [p for p in parameters if p.requires_grad]
        frozen = [p for p in parameters if not p.requires_grad] + list(self._model.buffers())
        return MeasuredFootprint(
            frozen_bytes=_tensor_bytes(frozen),
            trainable_bytes=_tensor_bytes(trainable),
            gradient_bytes=_tensor_bytes(p.grad for p in trainable if p.grad is not None),
            optimizer_bytes=_optimizer_state_bytes(optimizer),
            saved_activation_bytes=self._ledger.total_bytes,
            saved_weight_like_bytes=self._ledger.weight_like_bytes,
            cuda_peak_bytes=torch.cuda.max_memory_allocated() if self._cuda else None,
            saved_by_dtype=dict(self._ledger.by_dtype),
        )


def measure_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> MeasuredFootprint:
    """Run one forward/backward/optimizer step and count what it held.

    The step is taken for real; callers that must not move the weights pass a zero learning rate.
    """
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    measurement = StepMeasurement(model)
    with measurement.forward():
        loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    footprint = measurement.finish(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return footprint


def measure_lora_step(
    model: nn.Module, spec: "ModelSpec", settings_for: "SettingsFor", training: "Training", seed: int = 0,
    batch: dict[str, torch.Tensor] | None = None,
) -> MeasuredFootprint:
    """Attach LoRA as planned to `model` (already in the compute dtype), and measure one training step on a
    random batch of the plan's shape, the worst its data gives: full length, and padded where the plan's
    batches pad (the last token of the first sequence is padding, so attention runs with a mask). The
    optimizer's learning rate is zero: the weights do not move. `batch` replaces the random one (a real
    batch of the data, e.g. its `worst_batch`)."""
    from qra.runtime.lora import attach_lora

    model.config.use_cache = False
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    peft_model = attach_lora(model, spec, settings_for, dropout=training.lora_dropout)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.0)
    if batch is not None:
        return measure_training_step(peft_model, optimizer, batch)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (training.batch_size, training.seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if training.padded_batches:
        batch["attention_mask"][0, -1] = 0
        batch["labels"][0, -1] = -100
    return measure_training_step(peft_model, optimizer, batch)
