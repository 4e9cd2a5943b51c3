"""Human views of plans: a per-layer table, a memory breakdown, and what changed between two plans.

Functions return rich renderables or strings; printing is the caller's business (through its Console).
"""

import re
from typing import Any

from pydantic import BaseModel
from rich.table import Table
from rich.text import Text

from qra.errors import QraError
from qra.plans.memory import DTYPE_BYTES, linear_weight_bytes, lora_parameter_count
from qra.plans.schema import LayerPlan, MemoryEstimateRecord, ModuleOverride, Plan
from qra.plans.spec import ModelSpec
from qra.units import format_bytes

_HASH = re.compile(r"[0-9a-f]{64}")
_HASH_CHARS = 12


def plan_table(plan: Plan, spec: ModelSpec | None = None) -> Table:
    """One row per layer: bits, group size, rank, alpha, where its adapters start and per-module overrides.

    With `spec`, also each layer's base weight bytes (packed where quantized) and LoRA parameter
    bytes, and a totals row.
    """
    table = Table(title=f"{plan.model.id}: {len(plan.layers)} layers, budget {plan.budget.text}")
    for name in ("layer", "bits", "group", "rank", "alpha", "init"):
        table.add_column(name, justify="right")
    table.add_column("overrides")
    if spec is None:
        for layer in plan.layers:
            table.add_row(*_layer_cells(layer, plan.training.lora_init))
        return table
    table.add_column("base weights", justify="right")
    table.add_column("LoRA", justify="right")
    sizes = _layer_bytes(plan, spec)
    for layer, (weights, lora) in zip(plan.layers, sizes, strict=True):
        table.add_row(*_layer_cells(layer, plan.training.lora_init), format_bytes(weights), format_bytes(lora))
    table.add_section()
    total_weights, total_lora = (sum(column) for column in zip(*sizes, strict=True))
    table.add_row("total", "", "", "", "", "", "", format_bytes(total_weights), format_bytes(total_lora), style="bold")
    return table


def memory_table(components: dict[str, int], budget_bytes: int | None = None) -> Table:
    """Bytes per memory component with its share of the total, the total, and budget and headroom if given."""
    total = sum(components.values())
    table = Table(title="memory estimate")
    table.add_column("component")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for name, size in components.items():
        table.add_row(name, format_bytes(size), _share(size, total))
    table.add_section()
    table.add_row("total", format_bytes(total), _share(total, total), style="bold")
    if budget_bytes is not None:
        headroom = budget_bytes - total
        table.add_row("budget", format_bytes(budget_bytes), "")
        table.add_row("headroom", Text(format_bytes(headroom), style="green" if headroom >= 0 else "bold red"), "")
    return table


def plan_diff(a: Plan, b: Plan) -> list[str]:
    """What differs from plan `a` to plan `b`, one human line per change; empty when they are equal."""
    return [
        *_field_changes("model", a.model, b.model),
        *_budget_change(a, b),
        *_field_changes("training", a.training, b.training),
        *_field_changes("device", a.device, b.device),
        *_layer_changes(a.layers, b.layers),
        *_memory_change(a.memory, b.memory),
        *_field_changes("predicted", a.predicted, b.predicted),
        *_change("provenance.strategy", a.provenance.strategy, b.provenance.strategy),
    ]


def _override_text(overrides: dict[str, ModuleOverride]) -> str:
    """Compact per-module overrides, such as `down_proj: 8b r16, q_proj: g64 α32`."""
    return ", ".join(f"{name}: {_override_settings(override)}" for name, override in overrides.items())


def _override_settings(override: ModuleOverride) -> str:
    parts = [
        f"{override.bits}b" if override.bits is not None else "",
        f"g{override.group_size}" if override.group_size is not None else "",
        f"r{override.rank}" if override.rank is not None else "",
        f"α{override.alpha:g}" if override.alpha is not None else "",
        f"init {override.lora_init}" if override.lora_init is not None else "",
    ]
    return " ".join(part for part in parts if part) or "inherits all"


def _layer_cells(layer: LayerPlan, plan_init: str) -> tuple[str, ...]:
    return (str(layer.index), str(layer.bits), str(layer.group_size), str(layer.rank), f"{layer.alpha:g}",
            layer.lora_init or plan_init, _override_text(layer.modules))


def _layer_bytes(plan: Plan, spec: ModelSpec) -> list[tuple[int, int]]:
    """(base weight bytes, LoRA parameter bytes) of each layer, at the plan's settings and dtypes."""
    if spec.num_layers != len(plan.layers):
        raise QraError(f"the plan has {len(plan.layers)} layers but the model spec has {spec.num_layers}")
    compute_bytes = DTYPE_BYTES[plan.training.compute_dtype]
    adapter_bytes = DTYPE_BYTES[plan.training.adapter_dtype]
    sizes = []
    for index, modules in enumerate(spec.layers):
        settings = [(module, plan.module_settings(index, module.name)) for module in modules]
        weights = sum(linear_weight_bytes(module, s, compute_bytes) for module, s in settings)
        lora = sum(lora_parameter_count(module, s.rank) for module, s in settings) * adapter_bytes
        sizes.append((weights, lora))
    return sizes


def _share(size: int, total: int) -> str:
    return f"{100 * size / total:.1f}%" if total else "-"


def _value_text(value: Any) -> str:
    """A field value as a person reads it: YAML's spellings, fingerprints shortened."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and _HASH.fullmatch(value):
        return f"{value[:_HASH_CHARS]}…"
    return str(value)


def _change(name: str, old: Any, new: Any) -> list[str]:
    return [] if old == new else [f"{name}: {_value_text(old)} -> {_value_text(new)}"]


def _field_changes(prefix: str, a: BaseModel, b: BaseModel) -> list[str]:
    """`prefix.field: old -> new` for each field of two models of the same type that differs."""
    return [line for name in type(a).model_fields for line in _change(f"{prefix}.{name}", getattr(a, name), getattr(b, name))]


def _budget_change(a: Plan, b: Plan) -> list[str]:
    if a.budget.bytes == b.budget.bytes:
        return []
    if a.budget.text == b.budget.text:
        return [f"budget: {a.budget.bytes} bytes -> {b.budget.bytes} bytes"]
    return [f"budget: {a.budget.text} -> {b.budget.text}"]


def _layer_changes(a: list[LayerPlan], b: list[LayerPlan]) -> list[str]:
    lines = _change("layers", len(a), len(b))
    for old, new in zip(a, b):
        changes = [
            f"{name} {_value_text(getattr(old, name))} -> {_value_text(getattr(new, name))}"
            for name in ("bits", "group_size", "rank", "alpha", "lora_init")
            if getattr(old, name) != getattr(new, name)
        ]
        if old.modules != new.modules:
            changes.append(f"overrides {_override_text(old.modules) or 'none'} -> {_override_text(new.modules) or 'none'}")
        if changes:
            lines.append(f"layer {old.index}: {', '.join(changes)}")
    return lines


def _memory_change(a: MemoryEstimateRecord | None, b: MemoryEstimateRecord | None) -> list[str]:
    old, new = (None if record is None else record.total_bytes for record in (a, b))
    if old == new:
        return []
    return [f"memory.total_bytes: {_bytes_text(old)} -> {_bytes_text(new)}"]


def _bytes_text(size: int | None) -> str:
    return "none" if size is None else format_bytes(size)
