"""Where each adapter starts: zero (QLoRA), or the best rank-r correction of its module's quantization error.

A LoRA module computes `y = Q(W) x + s·B A x` with `s = alpha / r`. peft starts every adapter at `B = 0`, so the
fine-tune first spends steps undoing the quantization error `Δ = W - Q(W)`. A non-zero init starts at the
rank-r correction instead (docs/method.md, "Where adapters start"):

- `residual` (LoftQ, one iteration): `s·BA = [Δ]_r`, the top-r SVD of the error in weight space,
  minimizing `||Δ - s·BA||_F`.
- `calibrated` (CLoQ): minimize the error's effect on the module's output over the calibration inputs X,
  `||(Δ - s·BA) X||_F`. With `H = X Xᵀ`, damped as GPTQ damps it, and its Cholesky factor `H = R Rᵀ`, the
  minimizer is `s·BA = [Δ R]_r R⁻¹`: the top-r SVD `U S Vᵀ` of `Δ R`, then `U_r S_r (V_rᵀ R⁻¹)`.

A `Decomposition` holds the top-k components of one (module, bits) once; any rank up to k is a truncation of it
(`factors`), so the search pays one SVD per module and bit-width, not one per candidate. The Hessians come from
the float model's inputs (`calibration_hessians`), the same statistics for the search and `qra materialize`.
peft ships LoftQ only for bitsandbytes' NF4 and no calibrated init, so both are written here for GPTQ weights.
"""

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from qra.plans.memory import SettingsFor
from qra.plans.schema import LoraInit, ModuleSettings
from qra.plans.spec import LinearSpec, ModelSpec
from qra.runtime.data import Batch, to_device

log = logging.getLogger(__name__)

LORA_INITS: tuple[str, ...] = get_args(LoraInit)
# gptqmodel's default damp_percent for GPTQ: H + 0.05·mean(diag H)·I, so the factor exists for dead inputs too
DAMP = 0.05
Method = Literal["residual", "calibrated"]
HessianKey = tuple[int, str]  # (layer, role): the modules of a layer that read one input share it


@dataclass(frozen=True)
class Decomposition:
    """The top-k components of one module's correction: `Σ_i u_i s_i v_i` approximates the optimal rank-k
    `s·BA`. For `calibrated`, `v` is already `V_kᵀ R⁻¹`. fp32 on the CPU."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k]
    v: torch.Tensor  # [k, in]

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def factors(self, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """peft's `(A [r, in], B [out, r])` with `scale·B·A` the rank-`rank` truncation, the singular values
        split evenly between the two factors (as LoftQ splits them)."""
        if rank > self.rank:
            raise ValueError(f"rank {rank} is above the {self.rank} components kept")
        root = (self.s[:rank] / scale).sqrt()
        return root[:, None] * self.v[:rank], self.u[:, :rank] * root[None, :]

    def correction(self, rank: int) -> torch.Tensor:
        """`s·BA` at `rank`: what the adapter adds to the weight at step 0, `[out, in]`."""
        return (self.u[:, :rank] * self.s[:rank]) @ self.v[:rank]


def hessian_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor R of the damped Hessian, `H + DAMP·mean(diag H)·I = R Rᵀ` (fp64)."""
    damped = hessian.double().clone()
    damped.diagonal().add_(DAMP * damped.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.cholesky(damped)


def decompose(weight: torch.Tensor, quantized: torch.Tensor, rank: int, factor: torch.Tensor | None = None) -> Decomposition:
    """The top-`rank` correction of `Δ = weight - quantized` (both `[out, in]`): weight-space (`factor` None,
    LoftQ) or output-space for the calibration inputs whose damped Hessian has the lower Cholesky `factor` (CLoQ)."""
    error = weight.double() - quantized.double()
    target = error if factor is None else error @ factor
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, s.numel())
    v = vh[:k]
    if factor is not None:
        # V_kᵀ R⁻¹, i.e. X with X R = V_kᵀ: solve Rᵀ Xᵀ = V_k (R is lower, Rᵀ upper)
        v = torch.linalg.solve_triangular(factor.T, vh[:k].T, upper=True).T
    return Decomposition(u[:, :k].float().contiguous(), s[:k].float().contiguous(), v.float().contiguous())


def _accumulate(hessians: dict[HessianKey, torch.Tensor], key: HessianKey, mask: dict[str, torch.Tensor],
                module: nn.Module, inputs: tuple, output: object) -> None:
    rows = inputs[0].detach()[mask["mask"]].float()
    if key not in hessians:
        hessians[key] = torch.zeros(rows.shape[-1], rows.shape[-1], dtype=torch.float32)
    hessians[key] += (rows.T @ rows).cpu()


def calibration_hessians(model: nn.Module, spec: ModelSpec, calibration: Sequence[Batch],
                         layers: set[int] | None = None) -> dict[HessianKey, torch.Tensor]:
    """`H = X Xᵀ` (fp32, on the CPU, as GPTQ accumulates it) of every module input of the float `model` over the
    real (unpadded) tokens of the calibration batches, one per (layer, role), for the layers in `layers` (all by
    default)."""
    hessians: dict[HessianKey, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    handles = {}
    for index, layer in enumerate(spec.layers):
        if layers is not None and index not in layers:
            continue
        for module in layer:
            key = (index, module.role)
            if key not in handles:
                target = model.get_submodule(spec.module_path(index, module))
                handles[key] = target.register_forward_hook(functools.partial(_accumulate, hessians, key, mask))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for batch in calibration:
                batch = to_device(batch, device)
                mask["mask"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(was_training)
    return hessians


DecompositionFor = Callable[[int, LinearSpec, ModuleSettings], Decomposition]


def needs_init(spec: ModelSpec, settings_for: SettingsFor) -> bool:
    """Whether any quantized module of the configuration starts from a non-zero adapter."""
    return any(_starts_nonzero(settings_for(index, module)) for index, layer in enumerate(spec.layers) for module in layer)


def _starts_nonzero(settings: ModuleSettings) -> bool:
    # a 16-bit module has no quantization error: its adapter starts at zero whatever the init says
    return settings.lora_init != "zeros" and settings.bits < 16


def initialize_adapters(model: nn.Module, spec: ModelSpec, settings_for: SettingsFor, decomposition_for: DecompositionFor,
                        adapter: str = "default") -> int:
    """Set `lora_A` and `lora_B` of every module whose settings ask for a non-zero init to its rank-r correction,
    with peft's own scale of that module; returns how many were set. Modules at `zeros` keep peft's init."""
    wrappers = {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    count = 0
    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            if not _starts_nonzero(settings):
                continue
            lora = _lora_module(wrappers, spec.module_path(index, module))
            a, b = decomposition_for(index, module, settings).factors(settings.rank, float(lora.scaling[adapter]))
            with torch.no_grad():
                lora.lora_A[adapter].weight.copy_(a)
                lora.lora_B[adapter].weight.copy_(b)
            count += 1
    return count


def _lora_module(wrappers: dict[str, nn.Module], path: str) -> nn.Module:
    """The peft LoRA layer at `path` of the base model (peft prefixes the names with its own wrappers)."""
    for name, module in wrappers.items():
        if name == path or name.endswith("." + path):
            return module
    raise KeyError(f"no LoRA layer wraps {path}")
