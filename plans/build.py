"""Make plans from a model spec: a uniform plan (every layer the same bits and rank), and the memory
record that binds any plan's estimate to its budget."""

import math

from qra.plans.fingerprint import structural_fingerprint
from qra.plans.memory import MemoryEstimate, estimate_plan
from qra.plans.schema import Budget, Device, LayerPlan, MemoryEstimateRecord, ModelRef, Plan, Provenance, Training
from qra.plans.spec import ModelSpec


def model_ref(spec: ModelSpec, model_id: str, content_hash: str | None) -> ModelRef:
    return ModelRef(
        id=model_id,
        architecture=spec.architecture,
        num_layers=spec.num_layers,
        fingerprint=structural_fingerprint(spec),
        content_hash=content_hash,
    )


def budget_covering(total_bytes: int) -> Budget:
    """The smallest budget of whole tenths of a megabyte (10^5 bytes) that holds `total_bytes`."""
    megabytes = math.ceil(total_bytes / 10**5) / 10
    return Budget(bytes=int(round(megabytes * 10**6)), text=f"{megabytes:.1f}MB")


def memory_record(estimate: MemoryEstimate, budget_bytes: int) -> MemoryEstimateRecord:
    return MemoryEstimateRecord(
        components=dict(estimate.components),
        total_bytes=estimate.total_bytes,
        headroom_bytes=budget_bytes - estimate.total_bytes,
    )


def with_memory(plan: Plan, spec: ModelSpec) -> Plan:
    """The plan with its memory record recomputed from the memory model."""
    return plan.model_copy(update={"memory": memory_record(estimate_plan(spec, plan), plan.budget.bytes)})


def uniform_plan(
    spec: ModelSpec,
    ref: ModelRef,
    budget: Budget,
    bits: int,
    rank: int,
    group_size: int = 128,
    alpha: float | None = None,
    training: Training | None = None,
    device: Device | None = None,
) -> Plan:
    """Every layer at the same bits and rank: QLoRA's recipe, and the baseline every search is measured by."""
    layers = [
        LayerPlan(index=i, bits=bits, group_size=group_size, rank=rank, alpha=alpha or 2.0 * rank)
        for i in range(spec.num_layers)
    ]
    plan = Plan(
        model=ref,
        budget=budget,
        training=training or Training(),
        device=device or Device(),
        layers=layers,
        provenance=Provenance(strategy="uniform"),
    )
    return with_memory(plan, spec)
