"""A plan's training footprint, measured: the report `qra materialize` writes, and the same measurement
without quantizing (for benchmarks that score quality elsewhere).

A training step's memory depends on the shapes and dtypes of the tensors it holds, not on their values.
`measure_plan_footprint` therefore builds the plan's model with gptqmodel's TORCH linear at each module's
bits and group size holding zeros (the packed tensors of a real GPTQ quantization, byte for byte, without the
minutes GPTQ takes), attaches LoRA at each module's rank, and measures one training step of the plan's batch
shape with the harness of `qra.runtime.measure`.
"""

import torch
from torch import nn

from qra.plans.memory import PERSISTENT, estimate_plan, plan_settings
from qra.plans.schema import Plan
from qra.plans.spec import ModelSpec
from qra.runtime.measure import MeasuredFootprint, measure_lora_step
from qra.runtime.qlinear import enable_dequantize_in_backward
from qra.runtime.quantize import placeholder_quantized


def memory_report(plan: Plan, spec: ModelSpec, measured: MeasuredFootprint) -> dict:
    """Estimate vs measured, and whether the budget held. On CPU the harness sees the persistent terms;
    the transient terms and overhead of the estimate are added to make the measured peak comparable."""
    estimate = estimate_plan(spec, plan)
    persistent = measured.total_bytes
    peak = measured.cuda_peak_bytes or persistent + estimate.total_bytes - estimate.persistent_bytes
    return {
        "estimate": estimate.to_dict(),
        "measured": measured.to_dict(),
        "estimated_persistent_bytes": estimate.persistent_bytes,
        "measured_persistent_bytes": persistent,
        "persistent_error": (estimate.persistent_bytes - persistent) / persistent,
        "measured_peak_bytes": peak,
        "budget_bytes": plan.budget.bytes,
        "within_budget": peak <= plan.budget.bytes,
        "components_measured": list(PERSISTENT),
    }


def measure_plan_footprint(plan: Plan, spec: ModelSpec, model: nn.Module) -> dict:
    """The memory report of one training step of `plan` on `model` (a float model of the plan's
    architecture, consumed: its planned modules are replaced by zero-filled packed ones)."""
    settings = plan_settings(plan)
    model = model.to(getattr(torch, plan.training.compute_dtype))
    placeholder_quantized(model, spec, settings)
    if plan.training.dequantize_in_backward:
        enable_dequantize_in_backward(model)
    return memory_report(plan, spec, measure_lora_step(model, spec, settings, plan.training))
