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


def verify_plan(plan: Plan, spec: ModelSpec | None = None, content_hash: str | None = None) -> Verification:
    """Recompute the estimate where the model is known; otherwise check the plan's own memory record."""
    if spec is not None:
        problems = model_problems(plan, spec, content_hash)
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
