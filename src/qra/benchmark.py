"""The quality benchmark's terms, shared by the scripts in benchmarks/ and experiments/: the settings a
benchmark compiles and fine-tunes with, its budgets B1 and B2, the compile request of a budget and
granularity, and the names of the plans a run writes under its `--out` folder.

`Settings()` is the benchmark's setup (docs/benchmarks.md): SmolLM2-135M-Instruct on
python-reference+arithmetic, 40 steps at batch 4 x 128 tokens, learning rate 1e-3, bench seeds 10, 11 and 12.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

from qra.compiler.compile import CompileRequest
from qra.compiler.space import SearchSpace, parse_config_key
from qra.plans.build import budget_covering, with_memory
from qra.plans.memory import estimate_memory, uniform_settings
from qra.plans.schema import Budget, Device, Plan, Prediction, Training
from qra.plans.spec import ModelSpec
from qra.runtime.data import load_dataset, pads

MODEL = "smollm2-135m"
DATA = "python-reference+arithmetic"


@dataclass(frozen=True)
class Settings:
    """What a benchmark runs: the model, data and schedule every method trains with, the compile's effort,
    granularities, bits and ranks, where adapters start (`lora_init`), and the bench seeds (none of which takes part in a compile)."""

    model: str = MODEL
    data: str = DATA
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 40
    effort: str = "quick"
    seeds: tuple[int, ...] = (10, 11, 12)
    learning_rate: float = 1e-3
    granularities: tuple[str, ...] = ("layer", "module")
    bits: tuple[int, ...] = (3, 4, 8)
    ranks: tuple[int, ...] = (4, 8, 16)
    exact_match_examples: int = 50
    lora_init: str = "zeros"

    def training(self, seed: int = 0) -> Training:
        """The schedule every method trains with; its batches pad where the data's do (the memory model's
        worst batch)."""
        return Training(seq_len=self.seq_len, batch_size=self.batch_size, steps=self.steps,
                        learning_rate=self.learning_rate, seed=seed, padded_batches=_pads(self.data, self.batch_size),
                        lora_init=self.lora_init)


@functools.cache
def _pads(data: str, batch_size: int) -> bool:
    return pads(load_dataset(data), batch_size)


def footprint(spec: ModelSpec, bits: int, rank: int, training: Training, device: Device) -> int:
    """The memory model's total for uniform `bits` at `rank`."""
    return estimate_memory(spec, uniform_settings(bits, rank), training, device).total_bytes


def budget_for(spec: ModelSpec, bits: int, training: Training, device: Device, rank: int = 8) -> Budget:
    """The footprint of uniform `bits` at `rank`, rounded up to 0.1 MB, as a budget."""
    return budget_covering(footprint(spec, bits, rank, training, device))


def budgets_for(spec: ModelSpec, training: Training, device: Device) -> dict[str, Budget]:
    """B1: uniform 4-bit rank 8's footprint; B2: midway between uniform 3-bit rank 4 and 4-bit rank 4, so that
    no uniform 4-bit configuration fits."""
    low, high = footprint(spec, 3, 4, training, device), footprint(spec, 4, 4, training, device)
    middle = budget_covering((low + high) // 2)
    if middle.bytes >= high:
        middle = Budget(bytes=(low + high) // 2, text=f"{(low + high) / 2e6:.3f}MB")
    return {"B1": budget_for(spec, 4, training, device), "B2": middle}


def plan_name(settings: Settings, budget: Budget, granularity: str) -> str:
    """A compiled plan's name: `<model>-<budget>` at layer granularity, `<model>-<budget>-<granularity>` else."""
    return f"{settings.model}-{budget.text}{'' if granularity == 'layer' else '-' + granularity}"


def plan_path(out: Path, settings: Settings, budget: Budget, method: str) -> Path:
    """Where a benchmark run in `out` keeps a method's plan: `autoqra-<granularity>` as
    `plans/<plan name>.yaml`, a baseline (`uniform`, `sequential`, ...) as `plans/<layer plan name>.<method>.yaml`."""
    if method.startswith("autoqra-"):
        return out / "plans" / f"{plan_name(settings, budget, method.removeprefix('autoqra-'))}.yaml"
    return out / "plans" / f"{plan_name(settings, budget, 'layer')}.{method}.yaml"


def compile_request(settings: Settings, budget: Budget, granularity: str, out: Path) -> CompileRequest:
    """The compile of `settings` at `budget` and `granularity`, journaled under `out/plans` and cached under
    `out/work`, resumed where a journal exists."""
    return CompileRequest(
        model=settings.model, budget=budget, data=settings.data, effort=settings.effort, training=settings.training(),
        bits=settings.bits, ranks=settings.ranks, granularity=granularity,
        # the learning rate in the name: a compile stopped at another rate leaves a journal this one may not resume
        journal=out / "plans" / f"{plan_name(settings, budget, granularity)}.lr{settings.learning_rate:g}.journal.jsonl",
        work=out / "work", resume=True,
    )


def refused_finalist(plan: Plan, space: SearchSpace, spec: ModelSpec) -> Plan | None:
    """Where the compile's final pick refused its finalists (the plan is the uniform it compared them with),
    the best of them as a plan: run on the bench seeds too, it shows whether the search found a gain that the
    compile's fresh seeds could not confirm. None when the plan is a finalist."""
    scored = plan.provenance.finalists
    finalists = [record for record in scored if record.paired_difference is not None]
    if not finalists or space.layer_plans(parse_config_key(scored[0].config)) != plan.layers:
        return None
    best = min(finalists, key=lambda record: record.paired_difference)
    layers = space.layer_plans(parse_config_key(best.config))
    return with_memory(plan.model_copy(update={"layers": layers, "predicted": Prediction()}), spec)
