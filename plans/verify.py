"""Verify a plan: it belongs to the model, and its estimated peak fits its budget. No GPU needed."""

from dataclasses import dataclass, field

from qra.errors import QraError
from qra.plans.fingerprint import structural_fingerprint
from qra.plans.memory import estimate_plan
from qra.plans.schema import Plan
from qra.plans.spec import ModelSpec


@dataclass
class Verification:
    """The verdict: `problems` is empty when the plan is verified; `components` is the estimate used."""

    components: dict[str, int]
    total_bytes: int
    budget_bytes: int
    recomputed: bool
    problems: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.problems


def model_problems(plan: Plan, spec: ModelSpec, content_hash: str | None) -> list[str]:
    """Why the plan is not for this model (empty when it is); another layer count is a QraError."""
    if spec.num_layers != len(plan.layers):
        raise QraError(f"the plan has {len(plan.layers)} layers but the model has {spec.num_layers}: it is for another model")
    problems = []
    if structural_fingerprint(spec) != plan.model.fingerprint:
        problems.append(f"the model's fingerprint does not match the plan's (plan compiled for {plan.model.id!r})")
    if content_hash and plan.model.content_hash and content_hash != plan.model.content_hash:
        problems.append("the model's weights differ from those the plan was compiled on (content hash)")
    return problems


def for_data(plan: Plan, padded_batches: bool) -> Plan:
    """The plan as the memory model sees it on data whose batches pad (or not): a plan made for packed
    batches, run on data that pads, holds more for attention."""
    return plan.model_copy(update={"training": plan.training.model_copy(update={"padded_batches": padded_batches})})


def data_problem(plan: Plan, spec: ModelSpec, padded_batches: bool) -> str | None:
    """Why the plan does not fit on data whose batches pad (None when it does, or when they don't pad)."""
    if not padded_batches or plan.training.padded_batches:
        return None
    planned, needed = estimate_plan(spec, plan).total_bytes, estimate_plan(spec, for_data(plan, True)).total_bytes
    if needed <= plan.budget.bytes:
        return None
    return (f"the plan was made for batches without padding, but this data pads them (prompt/response examples): "
            f"attention then holds {needed - planned:,} bytes more, an estimated peak of {needed:,} bytes, over the "
            f"budget of {plan.budget.bytes:,} bytes ({plan.budget.text}); compile the plan for this data, or raise the budget")


def verify_plan(
    plan: Plan, spec: ModelSpec | None = None, content_hash: str | None = None, padded_batches: bool | None = None
) -> Verification:
    """Recompute the estimate where the model is known; otherwise check the plan's own memory record. With
    `padded_batches` (from the data it will train on), the estimate is for that data's worst batch."""
    if spec is not None:
        problems = model_problems(plan, spec, content_hash)
        if padded_batches:
            plan = for_data(plan, True)
        components = estimate_plan(spec, plan).components
        recomputed = True
    elif plan.memory is not None:
        problems = []
        components = dict(plan.memory.components)
        recomputed = False
        if sum(components.values()) != plan.memory.total_bytes:
            problems.append("the plan's memory record does not add up (components vs total_bytes)")
    else:
        raise QraError("the plan has no memory record and its model cannot be found: pass --model to recompute it")
    total = sum(components.values())
    if total > plan.budget.bytes:
        problems.append(f"estimated peak {total:,} bytes exceeds the budget of {plan.budget.bytes:,} bytes ({plan.budget.text})")
    return Verification(components, total, plan.budget.bytes, recomputed, problems)
