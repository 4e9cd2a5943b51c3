"""AutoQRA stage "quantization cache": each (module, bits) is GPTQ-quantized once, and every candidate reuses it.

Calibration is independent per module: forward hooks on the *float* model record the input of every linear
over the calibration batches (the sequences `qra materialize` gives gptqmodel:
`qra.runtime.data.calibration_sequences`), and gptqmodel's GPTQ algorithm quantizes each module against the
Hessian of its float input. Quantizing sequentially (each layer calibrated on the already-quantized layers before it)
would make a module's result depend on every earlier choice of the candidate, so it could not be cached,
and it exaggerates a layer's damage several-fold (see docs/measurements.md).

The algorithm is gptqmodel's own `GPTQ` class, configured as the real quantization pass configures it
(`QuantizeConfig(bits, group_size, sym=True, desc_act=False)`, a per-channel quantizer). Modules of a layer
that read the same input (q/k/v; gate/up) share one Hessian, and one inverse Hessian factor serves every
bit-width of a module (gptqmodel's `adopt_hessian_from` and `SharedHessianFactorCache`, its own mechanisms
for shared inputs). Such siblings are quantized in one GPTQ pass over their weights stacked by output rows:
GPTQ treats every output row on its own (its scales, zeros and error feedback are per row; only the Hessian
is shared), so the stacked pass gives each module exactly its own result (tested bit for bit), while its
column loop, a Python loop over the input features that dominates GPTQ's time on a CPU, runs once instead of
three times for q/k/v and twice for gate/up. The result is packed into gptqmodel's `TorchLinear` and
unpacked with its `dequantize_weight`, so the cached tensor holds exactly the fp16 values the packed GPTQ
module serves.

Cached weights stay in memory and, with a cache folder, on disk as safetensors under
`<folder>/<model fingerprint>/g<group size>-<calibration hash>/<module path>.<bits>bit.safetensors`, so a
resumed compile reuses them. For a non-zero adapter init the cache also keeps, per (module, bits), the top
components of the correction of its quantization error (`qra.runtime.lora_init.Decomposition`), in memory.
The cache must be asked while the model holds its float weights.
"""

import contextlib
import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qra.files import atomic_path
from qra.plans.fingerprint import structural_fingerprint
from qra.plans.memory import SettingsFor
from qra.plans.schema import ModuleSettings
from qra.plans.spec import LinearSpec, ModelSpec
from qra.runtime.data import Batch, to_device
from qra.runtime.heap import trim_heap
from qra.runtime.lora_init import Decomposition, HessianKey, calibration_hessians, decompose, hessian_factor, needs_init
from qra.runtime.quantize import quiet_gptqmodel

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """Weights served from memory (`hits`), loaded from the cache folder (`disk_hits`), and quantized
    (`misses`; a module quantized with the siblings that read its input counts once, and its first request
    is then a hit)."""

    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    quantize_s: float = 0.0


@dataclass
class _InputGroup:
    """The Hessian of one input that a layer's modules of one role read, and its inverse factors."""

    hessian: Any  # gptqmodel GPTQ task that only accumulates statistics
    factors: Any  # gptqmodel SharedHessianFactorCache


def batches_digest(batches: Iterable[Batch]) -> str:
    """sha256 over the token ids and attention masks of `batches`."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            tensor = batch[key].to(torch.int64).contiguous()
            digest.update(f"{key}{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def model_digest(model: nn.Module, spec: ModelSpec) -> str:
    """sha256 over the structural fingerprint and every decoder linear's weight (as fp32, so a bf16 model and
    its fp32 copy agree)."""
    digest = hashlib.sha256(structural_fingerprint(spec).encode())
    for index, layer in enumerate(spec.layers):
        for module in layer:
            weight = model.get_submodule(spec.module_path(index, module)).weight
            digest.update(weight.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _checksum(weight: torch.Tensor) -> str:
    return hashlib.sha256(weight.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear around `weight` (no copy), for gptqmodel's module-level APIs."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def _record(
    group: _InputGroup, current: dict[str, torch.Tensor], module: nn.Module, inputs: tuple, output: Any
) -> None:
    """Forward hook: add the input of the real (unpadded) tokens to the group's Hessian."""
    hidden = inputs[0].detach()
    group.hessian.add_batch(hidden[current["mask"]], None)


class QuantCache:
    """GPTQ-quantized, dequantized weights per (module, bits), computed once (AutoQRA's quantization cache)."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        calibration: Sequence[Batch],
        group_size: int = 128,
        folder: Path | None = None,
        max_rank: int = 32,
    ) -> None:
        self.model = model
        self.max_rank = max_rank
        self.spec = spec
        self.group_size = group_size
        self.calibration = list(calibration)
        self.calibration_hash = batches_digest(self.calibration)
        self.fingerprint = model_digest(model, spec)
        self.folder = (
            Path(folder).resolve() / self.fingerprint[:16] / f"g{group_size}-{self.calibration_hash[:16]}"
            if folder is not None
            else None
        )
        self.stats = CacheStats()
        self._weights: dict[tuple[int, str, int], torch.Tensor] = {}
        self._groups: dict[tuple[int, str], _InputGroup] | None = None
        self._decompositions: dict[tuple[int, str, int, str], Decomposition] = {}
        self._factors: dict[HessianKey, torch.Tensor] | None = None

    def weight(self, layer: int, module: LinearSpec, bits: int) -> torch.Tensor:
        """The dequantized fp16 weight `[out, in]` of `module` of `layer` GPTQ-quantized to `bits`."""
        if bits >= 16:
            raise ValueError(f"bits={bits}: 16-bit modules keep their float weight and are not cached")
        key = (layer, module.name, bits)
        if key in self._weights:
            self.stats.hits += 1
            return self._weights[key]
        weight = self._load(layer, module, bits)
        if weight is not None:
            self.stats.disk_hits += 1
            self._weights[key] = weight
            return weight
        siblings = [module]
        for other in self.spec.layers[layer]:
            if other == module or other.role != module.role or (layer, other.name, bits) in self._weights:
                continue
            on_disk = self._load(layer, other, bits)
            if on_disk is None:
                siblings.append(other)
            else:
                self.stats.disk_hits += 1
                self._weights[(layer, other.name, bits)] = on_disk
        began = time.perf_counter()
        quantized = self._quantize(layer, siblings, bits)
        self.stats.misses += len(siblings)
        self.stats.quantize_s += time.perf_counter() - began
        for sibling, sibling_weight in zip(siblings, quantized):
            self._save(layer, sibling, bits, sibling_weight)
            self._weights[(layer, sibling.name, bits)] = sibling_weight
        return self._weights[key]

    def quantize_all(self, bits: Iterable[int]) -> None:
        """Every module at each of `bits` in the cache, so that nothing asks for the calibration afterwards."""
        for width in bits:
            for index, layer in enumerate(self.spec.layers):
                for module in layer:
                    self.weight(index, module, width)

    def decomposition(self, layer: int, module: LinearSpec, bits: int, lora_init: str) -> Decomposition:
        """The top-`max_rank` correction of `module`'s error at `bits` for a `residual` or `calibrated` adapter
        init (`qra.runtime.lora_init`), computed once from the float weight, the cached GPTQ weight and (for
        `calibrated`) the float model's input Hessian. Asked while the model holds its float weights."""
        key = (layer, module.name, bits, lora_init)
        if key not in self._decompositions:
            weight = self.model.get_submodule(self.spec.module_path(layer, module)).weight.detach()
            factor = self._factor(layer, module.role) if lora_init == "calibrated" else None
            self._decompositions[key] = decompose(weight, self.weight(layer, module, bits), self.max_rank, factor)
        return self._decompositions[key]

    def decompose_all(self, bits: Iterable[int], lora_init: str) -> None:
        """Every module's decomposition at each of `bits`, so that nothing asks for the calibration afterwards."""
        if lora_init == "zeros":
            return
        for width in bits:
            for index, layer in enumerate(self.spec.layers):
                for module in layer:
                    self.decomposition(index, module, width, lora_init)

    def _factor(self, layer: int, role: str) -> torch.Tensor:
        if self._factors is None:
            began = time.perf_counter()
            hessians = calibration_hessians(self.model, self.spec, self.calibration)
            self._factors = {key: hessian_factor(hessian) for key, hessian in hessians.items()}
            log.info("input Hessians of %d module groups for the calibrated init in %.1fs", len(self._factors),
                     time.perf_counter() - began)
        return self._factors[(layer, role)]

    def release_calibration(self) -> None:
        """Drop the Hessians and their factors (a few hundred MB for a 135M model) once every needed weight and
        decomposition is cached, and hand the freed memory back to the operating system (`qra.runtime.heap`)."""
        self._groups = None
        self._factors = None
        trim_heap()

    def _path(self, layer: int, module: LinearSpec, bits: int) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{self.spec.module_path(layer, module)}.{bits}bit.safetensors"

    def _load(self, layer: int, module: LinearSpec, bits: int) -> torch.Tensor | None:
        """The entry on disk, if it is whole and what this cache would write: one that does not load, has
        another shape, dtype or key, or fails its checksum (a copy cut short, a flipped bit) is removed with
        a warning, and the weight is quantized again."""
        path = self._path(layer, module, bits)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                metadata, weight = handle.metadata() or {}, handle.get_tensor("weight")
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            return self._discard(path, f"it does not load ({error})")
        expected = {**self._metadata(layer, module, bits), "sha256": _checksum(weight)}
        if tuple(weight.shape) != (module.out_features, module.in_features) or weight.dtype != torch.float16:
            return self._discard(path, f"shape {tuple(weight.shape)} or dtype {weight.dtype} does not match the module")
        if metadata != expected:
            return self._discard(path, "its key or checksum does not match")
        return weight

    @staticmethod
    def _discard(path: Path, reason: str) -> None:
        log.warning("quantization cache entry %s is removed and rebuilt: %s", path, reason)
        path.unlink(missing_ok=True)
        return None

    def _metadata(self, layer: int, module: LinearSpec, bits: int) -> dict[str, str]:
        return {
            "fingerprint": self.fingerprint,
            "calibration": self.calibration_hash,
            "module": self.spec.module_path(layer, module),
            "bits": str(bits),
            "group_size": str(self.group_size),
        }

    def _save(self, layer: int, module: LinearSpec, bits: int, weight: torch.Tensor) -> None:
        path = self._path(layer, module, bits)
        if path is None:
            return
        metadata = {**self._metadata(layer, module, bits), "sha256": _checksum(weight)}
        with atomic_path(path, ".safetensors") as staging:
            save_file({"weight": weight.contiguous()}, staging, metadata=metadata)

    def _calibrate(self) -> dict[tuple[int, str], _InputGroup]:
        """One forward pass of the float model over the calibration batches, every module's input recorded."""
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ, SharedHessianFactorCache

        began = time.perf_counter()
        groups: dict[tuple[int, str], _InputGroup] = {}
        current: dict[str, torch.Tensor] = {}
        handles = []
        with quiet_gptqmodel():
            for index, layer in enumerate(self.spec.layers):
                for module in layer:
                    if (index, module.role) in groups:
                        continue
                    shape = torch.empty((module.out_features, module.in_features), device="meta")
                    group = _InputGroup(
                        GPTQ(_linear(shape), QuantizeConfig(offload_to_disk=False)),
                        SharedHessianFactorCache(generation=0, cohort=f"{index}.{module.role}"),
                    )
                    groups[(index, module.role)] = group
                    target = self.model.get_submodule(self.spec.module_path(index, module))
                    handles.append(target.register_forward_hook(functools.partial(_record, group, current)))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                device = next(self.model.parameters()).device
                for batch in self.calibration:
                    batch = to_device(batch, device)
                    current["mask"] = batch["attention_mask"].bool()
                    self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        log.info("calibrated %d module inputs on %d batches in %.1fs", len(groups), len(self.calibration),
                 time.perf_counter() - began)
        return groups

    def _quantize(self, layer: int, modules: Sequence[LinearSpec], bits: int) -> list[torch.Tensor]:
        """gptqmodel's GPTQ on the float weights of `modules` (of one layer, reading one input) stacked by
        output rows, then each module's rows packed and dequantized by gptqmodel's TorchLinear."""
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ

        if self._groups is None:
            self._groups = self._calibrate()
        group = self._groups[(layer, modules[0].role)]
        sources = [self.model.get_submodule(self.spec.module_path(layer, module)).weight.detach() for module in modules]
        config = QuantizeConfig(bits=bits, group_size=self.group_size, sym=True, desc_act=False, offload_to_disk=False)
        with quiet_gptqmodel():
            task = GPTQ(_linear(torch.cat(sources)), config)
            task.quantizer.configure(perchannel=True)
            task.attach_shared_hessian_cache(group.factors)
            task.adopt_hessian_from(group.hessian)
            quantized, scales, zeros, g_idx, *_ = task.quantize()
            task.free()
            rows = [slice(start - module.out_features, start)
                    for module, start in zip(modules, itertools.accumulate(module.out_features for module in modules))]
            return [self._packed(module, bits, quantized[part], scales[part], zeros[part], g_idx)
                    for module, part in zip(modules, rows)]

    def _packed(self, module: LinearSpec, bits: int, quantized: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
        """`module`'s GPTQ result packed into gptqmodel's TorchLinear and dequantized back: the fp16 weight
        `[out, in]` the packed module serves."""
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        packed = TorchLinear(
            bits=bits, group_size=self.group_size, sym=True, desc_act=False,
            in_features=module.in_features, out_features=module.out_features, bias=False,
        )
        packed.pack_original(linear=_linear(quantized.contiguous()), scales=scales.contiguous(), zeros=zeros.contiguous(),
                             g_idx=g_idx)
        return packed.dequantize_weight().T.contiguous()


class CachedWeights:
    """The search's weight source (a `qra.runtime.run.WeightSource`): the cache's model with every module
    below 16 bits holding its cached GPTQ weight, swapped in place; the float weights are back afterwards."""

    def __init__(self, cache: QuantCache) -> None:
        self.cache = cache
        self.model = cache.model
        self.spec = cache.spec

    def decomposition(self, layer: int, module: LinearSpec, settings: ModuleSettings) -> Decomposition:
        return self.cache.decomposition(layer, module, settings.bits, settings.lora_init)

    @contextlib.contextmanager
    def weights(self, settings_for: SettingsFor) -> Iterator[nn.Module]:
        if needs_init(self.spec, settings_for):  # from the float weights, before they are swapped out
            for index, layer in enumerate(self.spec.layers):
                for module in layer:
                    settings = settings_for(index, module)
                    if settings.bits < 16 and settings.lora_init != "zeros":
                        self.decomposition(index, module, settings)
        cached = [
            (self.spec.module_path(index, module), self.cache.weight(index, module, settings_for(index, module).bits))
            for index, layer in enumerate(self.spec.layers)
            for module in layer
            if settings_for(index, module).bits < 16
        ]
        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for path, weight in cached:
                parameter = self.model.get_submodule(path).weight
                swapped.append((parameter, parameter.data))
                parameter.data = weight.to(parameter.device, parameter.dtype)
            yield self.model
        finally:
            for parameter, original in swapped:
                parameter.data = original
            trim_heap()  # after GPTQ's churn, a fragmented heap makes the next measurement's page faults costly
