"""The weight-source gap before any fine-tuning: the same plan's weights from the search's quantization cache
(per-module GPTQ on the float model's inputs) and from `qra materialize`'s gptqmodel pass (sequential), each
swapped into the float model and scored on every held-out sequence; materialize's own packed model scored the
same way; and each source's squared error against the float weights. With `--plan` and `--train-seeds`, each of
the three is then fine-tuned with that plan's schedule through the same `Run` (same LoRA initialisation, same
batches), so a gap after training can be pinned on the weights (cached vs gptqmodel swapped) or on the packed
modules' training path (gptqmodel swapped vs packed).

    python experiments/weight_source_gap.py --bench runs/bench-quality \\
        --quantized runs/bench-quality/cache/quantized/<key> --out runs/bench-quality/weight-source-gap.json \\
        [--plan runs/bench-quality/plans/smollm2-135m-1546.2MB.uniform.yaml --train-seeds 10]

`--quantized` is a folder materialize's gptqmodel pass wrote (`benchmarks/bench_quality.py
--weight-source-gap` leaves the B1 uniform plan's under `<bench>/cache/quantized/`); every module's bits are
read from its `quantize_config.json`. The evaluator is the benchmark's (its data, schedule and quantization
cache under `<bench>/work`), so the cached weights are the ones the search scored. About 2 minutes on 2 cores,
and 6 more per training seed.
"""

import argparse
import contextlib
import json
import re
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qra.benchmark import DATA, MODEL, Settings, compile_request
from qra.compiler.compile import build_evaluator
from qra.compiler.finalists import paired_difference
from qra.files import write_text
from qra.plans.io import load_plan
from qra.compiler.fidelity import FidelityEvaluator
from qra.plans.memory import SettingsFor, plan_settings
from qra.plans.schema import Budget, Plan
from qra.runtime.heldout import score_held_out
from qra.runtime.quantize import GPTQModelWeights, load_quantized
from qra.runtime.run import WeightSource, open_run


def planned_bits(folder: Path) -> dict[str, int]:
    """Each quantized module's bits, from the `dynamic` entries of the checkpoint's quantize_config.json."""
    dynamic = json.loads((folder / "quantize_config.json").read_text())["dynamic"]
    bits = {}
    for pattern, settings in dynamic.items():
        if pattern.startswith("+:"):
            path = re.sub(r"\\(.)", r"\1", pattern[2:].strip("^$"))
            bits[path] = settings["bits"]
    return bits


class SwappedWeights:
    """A `qra.runtime.run.WeightSource`: `model` with each named module's weight swapped for the given one,
    the originals back afterwards (the search's `CachedWeights`, for weights from any source)."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.model, self.swapped = model, weights

    @contextlib.contextmanager
    def weights(self, settings_for: SettingsFor | None = None) -> Iterator[nn.Module]:
        originals = {path: self.model.get_submodule(path).weight.data for path in self.swapped}
        try:
            for path, weight in self.swapped.items():
                self.model.get_submodule(path).weight.data = weight.to(originals[path].dtype)
            yield self.model
        finally:
            for path, original in originals.items():
                self.model.get_submodule(path).weight.data = original


def fine_tune(source: WeightSource, evaluator: FidelityEvaluator, plan: Plan, seed: int) -> dict:
    """`plan`'s whole schedule on `source`'s weights through the runtime's `Run`, as the search runs it."""
    training = plan.training.model_copy(update={"seed": seed})
    with open_run(source, evaluator.space.spec, plan_settings(plan), training, evaluator.data.batch_for(training),
                  evaluator.data.held_out) as run:
        run.train_to(training.steps)
        scores = run.score()
        return {"seed": seed, "mean": scores.mean, "se": scores.se, "by_task": {t: v.loss for t, v in scores.by_task.items()},
                "training_losses": list(run.losses)}


def measure(bench: Path, quantized: Path, settings: Settings, plan: Plan | None = None, seeds: tuple[int, ...] = ()) -> dict:
    request = compile_request(settings, Budget(bytes=10**12, text="any"), "layer", bench)
    evaluator = build_evaluator(request)
    spec, model, held_out = evaluator.space.spec, evaluator.model, evaluator.data.held_out
    bits = planned_bits(quantized)
    modules = [(index, module, spec.module_path(index, module)) for index, layer in enumerate(spec.layers) for module in layer
               if spec.module_path(index, module) in bits]
    if plan is not None:
        settings_for = plan_settings(plan)
        wrong = [path for index, module, path in modules if settings_for(index, module).bits != bits[path]]
        if wrong or len(modules) != sum(settings_for(i, m).bits < 16 for i, layer in enumerate(spec.layers) for m in layer):
            raise SystemExit(f"{quantized} was not quantized to the bits of the plan (first difference: {(wrong or ['a 16-bit module'])[0]})")
    wrapper = load_quantized(quantized)
    sources = {
        "cached": SwappedWeights(model, {path: evaluator.cache.weight(index, module, bits[path]) for index, module, path in modules}),
        "gptqmodel": SwappedWeights(model, {path: wrapper.model.get_submodule(path).dequantize_weight().T.contiguous()
                                           for _, _, path in modules}),
    }
    scores = {"float": score_held_out(model, held_out)}
    errors = {}
    for name, source in sources.items():
        errors[name] = sum((weight.float() - model.get_submodule(path).weight.float()).pow(2).sum().item()
                           for path, weight in source.swapped.items())
        with source.weights() as swapped:
            scores[name] = score_held_out(swapped, held_out)
    packed = wrapper.model.eval()  # materialize's own model: the packed modules, its fp32 rotary frequencies
    scores["gptqmodel, packed"] = score_held_out(packed, held_out)
    result = {
        "quantized": str(quantized), "modules": len(modules),
        "held_out_loss": {name: {"mean": s.mean, "se": s.se, "by_task": {t: v.loss for t, v in s.by_task.items()}}
                          for name, s in scores.items()},
        "squared_weight_error": errors,
    }
    if plan is not None and seeds:
        # materialize's own weight source: the checkpoint exists, so it is loaded, not quantized again
        sources["gptqmodel, packed"] = GPTQModelWeights(quantized, spec, [], quantized, plan.training.compute_dtype,
                                                        plan.training.dequantize_in_backward)
        result["fine_tuned"] = {name: [fine_tune(source, evaluator, plan, seed) for seed in seeds] for name, source in sources.items()}
    return result


def _paired(values: list[float], cached: list[float]) -> str:
    difference = paired_difference(values, cached)
    return f"{difference.mean:+.4f}" + (f" ± {difference.se:.4f}" if difference.seeds > 1 else "")


def markdown(result: dict) -> str:
    tasks = list(result["held_out_loss"]["float"]["by_task"])
    lines = [f"Weights before fine-tuning ({result['modules']} quantized modules), held-out loss on every sequence:", "",
             "| weights | loss (mean of tasks) | " + " | ".join(tasks) + " | squared error vs float |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for name, loss in result["held_out_loss"].items():
        error = result["squared_weight_error"].get(name)
        cells = " | ".join(f"{loss['by_task'][task]:.4f}" for task in tasks)
        lines.append(f"| {name} | {loss['mean']:.4f} ± {loss['se']:.4f} | {cells} | {'' if error is None else f'{error:,.0f}'} |")
    if "fine_tuned" in result:
        lines += ["", "After fine-tuning each with the plan's schedule through the same `Run` (held-out loss on every sequence; "
                  "paired: the difference from the cached weights paired by seed, mean ± SE over seeds):", "",
                  "| weights | seeds | loss (mean of tasks) | " + " | ".join(tasks) + " | paired vs cached | "
                  + " | ".join(f"paired {task}" for task in tasks) + " |",
                  "|---|---|---|" + "---|" * (2 * len(tasks) + 1)]
        cached = result["fine_tuned"]["cached"]
        for name, runs in result["fine_tuned"].items():
            mean = statistics.fmean(run["mean"] for run in runs)
            cells = " | ".join(f"{statistics.fmean(run['by_task'][task] for run in runs):.4f}" for task in tasks)
            pairs = [_paired([run["mean"] for run in runs], [run["mean"] for run in cached])]
            pairs += [_paired([run["by_task"][task] for run in runs], [run["by_task"][task] for run in cached]) for task in tasks]
            lines.append(f"| {name} | {', '.join(str(run['seed']) for run in runs)} | {mean:.4f} | {cells} | "
                         + " | ".join("" if name == "cached" else pair for pair in pairs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--quantized", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality/weight-source-gap.json"))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--plan", type=Path, help="the plan --quantized was quantized for (its ranks and schedule)")
    parser.add_argument("--train-seeds", default="", help="fine-tune every source with the plan's schedule on these seeds")
    args = parser.parse_args()
    plan = load_plan(args.plan) if args.plan is not None else None
    seeds = tuple(int(seed) for seed in args.train_seeds.split(",") if seed)
    if seeds and plan is None:
        parser.error("--train-seeds needs --plan")
    learning_rate = plan.training.learning_rate if plan is not None else 1e-3
    settings = Settings(model=args.model, data=args.data, seeds=(10,), learning_rate=learning_rate)
    result = measure(args.bench, args.quantized, settings, plan, seeds)
    write_text(args.out, json.dumps(result, indent=2))
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
