"""How a fine-tune gets to its score: a benchmark's plans trained with the benchmark's own pipeline and
schedule, observed every few steps, under a gradient clipping norm of your choice.

    python experiments/train_dynamics.py --bench runs/bench-quality --methods uniform,finalist-layer --seeds 10,11,12 \\
        --max-grad-norm 1.0 --out runs/bench-quality/train-dynamics.jsonl

Each (method, seed) is one `Run` of the plan at `--budget` (weights from the benchmark's quantization cache,
the benchmark's data, batches and learning rate), scored on each task's whole held-out set every `--every`
steps. One JSON line per run: the held-out loss of every task at each checkpoint, each step's training loss
and its gradient norm before clipping. A rerun skips the runs `--out` already holds. The printed table has
each method's final task losses per seed and their differences from the first method, paired by seed.

`--bench` is a `benchmarks/bench_quality.py --out` folder. `finalist-<granularity>` is the finalist a compile
refused (as `bench_quality.py` benches it). With `--max-grad-norm` equal to the benchmark's own (or 0 for a
benchmark made before plans clipped), a run's final scores are the benchmark's evaluator-mode scores for that
seed.
"""

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from qra.benchmark import Settings, budgets_for, compile_request, plan_path, refused_finalist
from qra.compiler.compile import build_evaluator, resolve
from qra.compiler.fidelity import FidelityEvaluator
from qra.plans.io import load_plan
from qra.plans.memory import plan_settings
from qra.plans.schema import Device, Plan
from qra.plans.spec import resolve_spec
from qra.runtime.run import open_run

log = logging.getLogger("train_dynamics")


def bench_settings(bench: Path) -> Settings:
    """The schedule and data a benchmark ran with, from its report."""
    report = json.loads((bench / "quality.json").read_text())
    # reports written before they named their bits and ranks used the defaults
    choices = {key: tuple(report[key]) for key in ("bits", "ranks") if key in report}
    return Settings(report["model"], report["data"], report["seq_len"], report["batch_size"], report["steps"],
                    report["effort"], tuple(report["seeds"]), learning_rate=report["learning_rate"], **choices)


def method_plan(bench: Path, settings: Settings, budget_name: str, method: str, evaluator: FidelityEvaluator) -> Plan:
    """A benchmark's plan by its method name: the autoqra plan, a baseline, or the compile's refused finalist."""
    budget = budgets_for(evaluator.space.spec, settings.training(), Device())[budget_name]
    if method.startswith("finalist-"):
        granularity = method.removeprefix("finalist-")
        plan = load_plan(plan_path(bench, settings, budget, f"autoqra-{granularity}"))
        space = resolve(compile_request(settings, budget, granularity, bench)).space
        finalist = refused_finalist(plan, space, space.spec)
        if finalist is None:
            raise SystemExit(f"the {granularity} compile at {budget.text} refused no finalist")
        return finalist
    return load_plan(plan_path(bench, settings, budget, method))


def observe(evaluator: FidelityEvaluator, plan: Plan, seed: int, max_grad_norm: float | None, every: int) -> dict:
    """One run of `plan` on `seed` with gradients clipped at `max_grad_norm`, scored every `every` steps."""
    training = plan.training.model_copy(update={"seed": seed, "max_grad_norm": max_grad_norm})
    checkpoints = []
    with open_run(evaluator.weights, evaluator.space.spec, plan_settings(plan), training,
                  evaluator.data.batch_for(training), evaluator.data.held_out) as run:
        while run.step < training.steps:
            run.train_to(run.step + every)
            checkpoints.append({"step": run.step, "held_out": run.score().losses()})
            log.info("seed %d step %d: %s", seed, run.step, checkpoints[-1]["held_out"])
        return {"seed": seed, "max_grad_norm": max_grad_norm, "checkpoints": checkpoints, "train_losses": list(run.losses),
                "gradient_norms": list(run.gradient_norms), "final": checkpoints[-1]["held_out"]}


def table(runs: list[dict]) -> str:
    """Final task losses per method and seed, and each method's difference from the first, paired by seed."""
    methods = list(dict.fromkeys(run["method"] for run in runs))
    tasks = list(runs[0]["final"])
    by = {(run["method"], run["seed"]): run["final"] for run in runs}
    seeds = sorted({run["seed"] for run in runs})
    lines = ["| method | seed | " + " | ".join(tasks) + " | mean | paired vs " + methods[0] + " (mean) |",
             "|---" * (len(tasks) + 4) + "|"]
    for method in methods:
        differences = []
        for seed in seeds:
            final = by.get((method, seed))
            if final is None:
                continue
            mean = statistics.fmean(final.values())
            base = by.get((methods[0], seed))
            difference = mean - statistics.fmean(base.values()) if base is not None else None
            if difference is not None:
                differences.append(difference)
            lines.append(f"| {method} | {seed} | " + " | ".join(f"{final[task]:.4f}" for task in tasks)
                         + f" | {mean:.4f} | {'' if difference is None else f'{difference:+.4f}'} |")
        if method != methods[0] and len(differences) > 1:
            se = statistics.stdev(differences) / len(differences) ** 0.5
            lines.append(f"| {method} | paired | | | | {statistics.fmean(differences):+.4f} ± {se:.4f} (SE) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", type=Path, required=True, help="a benchmarks/bench_quality.py --out folder")
    parser.add_argument("--budget", default="B1")
    parser.add_argument("--methods", default="uniform,finalist-layer")
    parser.add_argument("--seeds", default="10,11,12")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--every", type=int, default=5, help="score every this many steps")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per run (appended)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = bench_settings(args.bench)
    budget = budgets_for(resolve_spec(settings.model).spec, settings.training(), Device())[args.budget]
    evaluator = build_evaluator(compile_request(settings, budget, "layer", args.bench))
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    clip = args.max_grad_norm or None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(seed) for seed in args.seeds.split(",")):
        for method in args.methods.split(","):
            if any(run["method"] == method and run["seed"] == seed and run["max_grad_norm"] == clip for run in done):
                continue
            plan = method_plan(args.bench, settings, args.budget, method, evaluator)
            record = {"method": method, **observe(evaluator, plan, seed, clip, args.every)}
            with args.out.open("a") as out:
                out.write(json.dumps(record) + "\n")
            done.append(record)
    sys.stdout.write(table([run for run in done if run["max_grad_norm"] == clip]) + "\n")


if __name__ == "__main__":
    main()
