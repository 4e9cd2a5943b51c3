"""On a real GPU: qra fine-tunes on CUDA, and the memory model is checked against the allocator.

    python benchmarks/gpu_check.py --out runs/gpu-check              # a CUDA machine: about 5-8 minutes
    python benchmarks/gpu_check.py --dry-run --out runs/gpu-dry-run  # anywhere: the same steps on CPU, tiny models

One command, end to end, so that it can be rerun once after a fix:

1. SmolLM2-135M: `qra materialize` (in process, so every step is observed) of three plans on
   python-reference+arithmetic, a short fine-tune each: uniform 4-bit rank 8, a plan mixed by layer, and a
   plan mixed by module. After each step: `torch.cuda.max_memory_allocated` (its peak is reset before the
   next step) and `torch.cuda.memory_reserved`.
2. Llama-3-8B from its shipped config, with no quantization run: gptqmodel's packed modules holding zeros
   (`runtime/quantize.py: placeholder_quantized`; memory depends on shapes and dtypes, not values), one
   measured step at seq 2048, batch 1, gradient checkpointing: uniform 4-bit rank 16, and a mixed plan at
   the low end (no configuration of it fits 8 GB at 2048 tokens: uniform 2-bit rank 8 needs 8.9 GB).
3. The device context: device memory in use once CUDA is initialized and before anything is allocated.

Each plan's budget is its own estimate, rounded up to 0.1 MB, with the measured context in place of the
default 500 MB. A row: the memory model's estimate (total, and its persistent and transient parts), the
measured peak (the largest `max_memory_allocated` of any step) plus the context, the error, and whether the
measured peak stays within the budget. Targets: the estimate within 3% of the measured peak and context,
never under it by more than 1%, and every plan within its budget.

Not measured here: a compile on CUDA (the compile's evaluator runs on the CPU only, so far).

`--dry-run` runs every step on the CPU with a tiny Llama in place of both models; it claims no CUDA figure
(the CUDA columns say "dry run"), and the suite runs it (`tests/test_gpu_check.py`).
Writes OUT/gpu-check.json and OUT/gpu-check.md.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qra.benchmark import DATA, MODEL
from qra.files import write_text
from qra.models import content_hash
from qra.plans.build import budget_covering, model_ref, uniform_plan, with_memory
from qra.plans.memory import estimate_memory, plan_settings
from qra.plans.schema import Budget, Device, ModuleOverride, Plan, Training
from qra.plans.spec import resolve_spec
from qra.runtime.data import load_dataset, training_for
from qra.runtime.materialize import MaterializeRequest, materialize
from qra.runtime.measure import measure_lora_step
from qra.runtime.qlinear import enable_dequantize_in_backward
from qra.runtime.quantize import placeholder_quantized
from qra.testing import save_tiny_model

log = logging.getLogger("gpu_check")
DRY_RUN = "dry run"


@dataclass(frozen=True)
class Setup:
    """What the check runs on: the real models on CUDA, or tiny stand-ins on the CPU (`--dry-run`)."""

    small_model: str
    large_model: str
    device: str
    small_training: Training
    large_training: Training

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def real_setup(steps: int) -> Setup:
    return Setup(MODEL, "llama-3-8b", "cuda",
                 Training(seq_len=128, batch_size=4, steps=steps, learning_rate=1e-3),
                 Training(seq_len=2048, batch_size=1, gradient_checkpointing=True, steps=1))


def dry_setup(folder: Path) -> Setup:
    """A tiny Llama saved to `folder` (with `qra.testing`'s tokenizer) stands in for both models."""
    model = save_tiny_model(folder / "tiny", "llama", layers=4)
    return Setup(str(model), str(model), "cpu", Training(seq_len=48, batch_size=2, steps=2, learning_rate=1e-3),
                 Training(seq_len=96, batch_size=1, gradient_checkpointing=True, steps=1))


def device_context() -> int:
    """Bytes of device memory in use before torch allocates anything: the CUDA context (and any other process)."""
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def _budgeted(plan: Plan, spec) -> Plan:
    """`plan` with its own estimate, rounded up to 0.1 MB, as its budget."""
    budget = budget_covering(estimate_memory(spec, plan_settings(plan), plan.training, plan.device).total_bytes)
    return with_memory(plan.model_copy(update={"budget": budget}), spec)


def small_plans(setup: Setup, device: Device) -> dict[str, Plan]:
    """Uniform 4-bit r8, mixed by layer (3/4/8 bits, ranks 16/8/4 in turn), mixed by module (4-bit r8 with
    down_proj and v_proj at 8 bits, rank 4)."""
    source, spec, _ = resolve_spec(setup.small_model)
    training = training_for(setup.small_training, load_dataset(DATA))
    reference = model_ref(spec, source.name, content_hash(source))
    uniform = uniform_plan(spec, reference, Budget(bytes=10**12, text="1TB"), 4, 8, training=training, device=device)
    by_layer = [layer.model_copy(update={"bits": (3, 4, 8)[i % 3], "rank": (16, 8, 4)[i % 3], "alpha": 2.0 * (16, 8, 4)[i % 3]})
                for i, layer in enumerate(uniform.layers)]
    eight = ModuleOverride(bits=8, rank=4, alpha=8.0)
    by_module = [layer.model_copy(update={"modules": {"mlp.down_proj": eight, "self_attn.v_proj": eight}}) for layer in uniform.layers]
    plans = {"uniform 4-bit r8": uniform, "mixed by layer": uniform.model_copy(update={"layers": by_layer}),
             "mixed by module": uniform.model_copy(update={"layers": by_module})}
    return {name: _budgeted(plan, spec) for name, plan in plans.items()}


def materialize_row(name: str, plan: Plan, setup: Setup, out: Path, context: int) -> dict:
    """`qra materialize` of `plan` with every step's allocator peak recorded."""
    steps: list[dict] = []

    def on_step(entry) -> None:
        if setup.cuda:
            steps.append({"step": entry.step, "max_allocated": torch.cuda.max_memory_allocated(),
                          "reserved": torch.cuda.memory_reserved()})
            torch.cuda.reset_peak_memory_stats()

    began = time.perf_counter()
    request = MaterializeRequest(plan=plan, output=out / name.replace(" ", "-"), data=DATA, model=setup.small_model,
                                 exact_match_examples=0)
    results = materialize(request, on_step=on_step)
    memory = results["memory"]
    peak = max((step["max_allocated"] for step in steps), default=None)
    return _row(name, plan, memory["estimate"], memory["measured_persistent_bytes"], peak, context, steps,
                train_s=results["wall_s"]["train"], wall_s=time.perf_counter() - began)


def large_plans(setup: Setup, device: Device) -> dict[str, Plan]:
    """Uniform 4-bit r16, and 2-bit rank 8 with down_proj and v_proj at 4 bits, rank 16."""
    source, spec, _ = resolve_spec(setup.large_model)
    reference = model_ref(spec, source.name, None)
    uniform = uniform_plan(spec, reference, Budget(bytes=10**12, text="1TB"), 4, 16, training=setup.large_training, device=device)
    layers = [layer.model_copy(update={"bits": 2, "rank": 8, "alpha": 16.0, "modules": {
        name: ModuleOverride(bits=4, rank=16, alpha=32.0) for name in ("mlp.down_proj", "self_attn.v_proj")}})
        for layer in uniform.layers]
    plans = {"uniform 4-bit r16": uniform, "mixed 2/4-bit r8/16": uniform.model_copy(update={"layers": layers})}
    return {name: _budgeted(plan, spec) for name, plan in plans.items()}


def placeholder_row(name: str, plan: Plan, setup: Setup, context: int) -> dict:
    """One measured training step of `plan` on zero-filled packed modules, on random tokens."""
    from transformers import AutoModelForCausalLM

    _, spec, config = resolve_spec(setup.large_model)
    dtype = getattr(torch, plan.training.compute_dtype)
    with torch.device(setup.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    settings = plan_settings(plan)
    placeholder_quantized(model, spec, settings)
    model.to(setup.device)
    enable_dequantize_in_backward(model)
    ids = torch.randint(0, spec.vocab_size, (plan.training.batch_size, plan.training.seq_len), device=setup.device)
    began = time.perf_counter()
    measured = measure_lora_step(model, spec, settings, plan.training,
                                 batch={"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    estimate = estimate_memory(spec, settings, plan.training, plan.device)
    steps = [{"step": 1, "max_allocated": measured.cuda_peak_bytes, "reserved": torch.cuda.memory_reserved()}] if setup.cuda else []
    row = _row(name, plan, estimate.to_dict(), measured.total_bytes, measured.cuda_peak_bytes, context, steps,
               train_s=time.perf_counter() - began, wall_s=time.perf_counter() - began)
    del model
    if setup.cuda:
        torch.cuda.empty_cache()
    return row


def _row(name: str, plan: Plan, estimate: dict, persistent: int, peak: int | None, context: int, steps: list[dict],
         train_s: float, wall_s: float) -> dict:
    """Estimate vs measured for one plan; the CUDA figures are None without CUDA."""
    transient = sum(estimate[key] for key in ("logits_workspace", "recompute_workspace", "dequantize_workspace", "allocator_slack"))
    row = {
        "plan": name, "model": plan.model.id, "budget_bytes": plan.budget.bytes, "estimate_bytes": estimate["total_bytes"],
        "estimate_persistent_bytes": estimate["total_bytes"] - transient - estimate["context"],
        "estimate_transient_bytes": transient, "estimate_context_bytes": estimate["context"],
        "measured_persistent_bytes": persistent, "measured_peak_bytes": peak, "measured_context_bytes": context if peak else None,
        "steps": steps, "train_s": round(train_s, 1), "wall_s": round(wall_s, 1),
    }
    if peak is not None:
        measured = peak + context
        row["error"] = (estimate["total_bytes"] - measured) / measured
        row["within_budget"] = measured <= plan.budget.bytes
    return row


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; context {_mb(report['context_bytes'])}. Estimate: the memory model with the "
        "measured context; measured: the largest `torch.cuda.max_memory_allocated` of any step, plus the context.",
        "",
        "| plan | budget MB | estimate MB (persistent + transient + context) | measured persistent MB (harness) | "
        "measured peak + context MB | error | within budget | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        estimate = (f"{_mb(row['estimate_bytes'])} ({_mb(row['estimate_persistent_bytes'])} + "
                    f"{_mb(row['estimate_transient_bytes'])} + {_mb(row['estimate_context_bytes'])})")
        measured = DRY_RUN if row["measured_peak_bytes"] is None else _mb(row["measured_peak_bytes"] + row["measured_context_bytes"])
        error = DRY_RUN if "error" not in row else f"{row['error']:+.2%}"
        within = DRY_RUN if "within_budget" not in row else ("yes" if row["within_budget"] else "**no**")
        lines.append(f"| {row['model']}: {row['plan']} | {_mb(row['budget_bytes'])} | {estimate} | "
                     f"{_mb(row['measured_persistent_bytes'])} | {measured} | {error} | {within} | {row['train_s']} |")
    return "\n".join(lines) + "\n"


def _mb(value: int | None) -> str:
    return DRY_RUN if value is None else f"{value / 1e6:.1f}"


def run_check(setup: Setup, out: Path) -> dict:
    if setup.cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here: run with --dry-run, or on a machine with a GPU")
    context = device_context() if setup.cuda else 0
    device = Device(kind="cuda" if setup.cuda else "cpu", context_bytes=context)
    rows = []
    for name, plan in small_plans(setup, device).items():
        log.info("materializing %s", name)
        rows.append(materialize_row(name, plan, setup, out, context))
    for name, plan in large_plans(setup, device).items():
        log.info("measuring %s on %s", name, setup.large_model)
        rows.append(placeholder_row(name, plan, setup, context))
    name = torch.cuda.get_device_name() if setup.cuda else f"CPU ({DRY_RUN}: no CUDA figure)"
    return {"device": name, "context_bytes": context if setup.cuda else None, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--steps", type=int, default=10, help="fine-tune steps of each SmolLM2 plan")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with a tiny model: no CUDA figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    setup = dry_setup(args.out) if args.dry_run else real_setup(args.steps)
    report = run_check(setup, args.out)
    write_text(args.out / "gpu-check.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_text(args.out / "gpu-check.md", table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
