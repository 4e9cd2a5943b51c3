"""What the adapter init alone gives: the quality benchmark's uniform plans (B1: uniform 4-bit rank 8, B2: uniform
3-bit rank 4) fine-tuned from each `lora_init`, paired by bench seed against the zero init, with the 16-bit
ceiling (LoRA rank 8 from zero on the unquantized model) for the gap closed.

    python experiments/init_gain.py --out runs/init-gain --inits zeros,residual,calibrated --seeds 10,11,12

Each fine-tune is the benchmark's evaluator-mode run (`FidelityEvaluator.measure_plan`: the search's pipeline,
the plan's whole schedule, every held-out sequence). `--learning-rates residual=5e-4,...` gives an init its own
rate (default: the benchmark's 1e-3 for all). Results go to `--out/runs.jsonl` as each run ends, so a rerun
skips what is done; the table (markdown) is printed and written to `--out/init-gain.md`.
"""

import argparse
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

from qra.benchmark import Settings, budget_for, budgets_for, compile_request
from qra.compiler.compile import build_evaluator
from qra.models import content_hash
from qra.plans.build import model_ref, uniform_plan
from qra.plans.schema import Device, Plan
from qra.plans.spec import resolve_spec

log = logging.getLogger("init_gain")
UNIFORM = {"B1": (4, 8), "B2": (3, 4)}
CEILING = "16-bit r8"


def plans_for(settings: Settings) -> dict[str, Plan]:
    source, spec, _ = resolve_spec(settings.model)
    reference = model_ref(spec, source.name, content_hash(source))
    training = settings.training()
    budgets = budgets_for(spec, training, Device())
    plans = {f"{name} uniform {bits}-bit r{rank}": uniform_plan(spec, reference, budgets[name], bits, rank, training=training,
                                                               device=Device())
             for name, (bits, rank) in UNIFORM.items()}
    plans[CEILING] = uniform_plan(spec, reference, budget_for(spec, 16, training, Device(), 8), 16, 8, training=training,
                                  device=Device())
    return plans


def load_runs(path: Path) -> dict[tuple[str, str, int], dict]:
    if not path.is_file():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(run["init"], run["plan"], run["seed"]): run for run in runs}


def paired(rows: list[tuple[float, float]]) -> tuple[float, float]:
    differences = [a - b for a, b in rows]
    mean = statistics.fmean(differences)
    se = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    return mean, se


def table(runs: dict[tuple[str, str, int], dict], inits: list[str], seeds: list[int], plan_names: list[str]) -> str:
    lines = ["| plan | init | learning rate | loss (mean ± std over seeds) | paired vs zeros | gap closed |",
             "|---|---|---|---|---|---|"]
    for plan in plan_names:
        for init in inits if plan != CEILING else ["zeros"]:
            losses = [runs[(init, plan, seed)]["loss"] for seed in seeds if (init, plan, seed) in runs]
            if not losses:
                continue
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            rate = runs[(init, plan, seeds[0])]["learning_rate"] if (init, plan, seeds[0]) in runs else ""
            against = [(runs[(init, plan, s)]["loss"], runs[("zeros", plan, s)]["loss"]) for s in seeds
                       if (init, plan, s) in runs and ("zeros", plan, s) in runs]
            vs_zeros = ""
            if init != "zeros" and against:
                mean, se = paired(against)
                vs_zeros = f"{mean:+.4f} ± {se:.4f}"
            gap = ""
            ceiling = [runs[("zeros", CEILING, s)]["loss"] for s in seeds if ("zeros", CEILING, s) in runs]
            zero = [runs[("zeros", plan, s)]["loss"] for s in seeds if ("zeros", plan, s) in runs]
            if plan != CEILING and ceiling and zero and statistics.fmean(zero) != statistics.fmean(ceiling):
                gap = f"{(statistics.fmean(zero) - statistics.fmean(losses)) / (statistics.fmean(zero) - statistics.fmean(ceiling)):.0%}"
            lines.append(f"| {plan} | {init} | {rate} | {statistics.fmean(losses):.4f} ± {spread:.4f} | {vs_zeros} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/init-gain"))
    parser.add_argument("--inits", default="zeros,residual,calibrated")
    parser.add_argument("--seeds", default="10,11,12")
    parser.add_argument("--learning-rates", default="", help="init=rate,... (default: the benchmark's rate for every init)")
    parser.add_argument("--plans", default="", help="only these plans (comma-separated names as the table prints them)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    inits, seeds = args.inits.split(","), [int(seed) for seed in args.seeds.split(",")]
    rates = {init: float(rate) for init, rate in (item.split("=") for item in args.learning_rates.split(",") if item)}
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / "runs.jsonl"
    runs = load_runs(journal)
    plan_names: list[str] = []
    for init in inits:
        settings = Settings(lora_init=init)
        settings = replace(settings, learning_rate=rates.get(init, settings.learning_rate))
        plans = plans_for(settings)
        plan_names = list(plans)
        wanted = [(name, plan) for name, plan in plans.items() if (init == "zeros" or name != CEILING)
                  and (not args.plans or name in args.plans.split(","))]
        evaluator = None
        for seed in seeds:
            for name, plan in wanted:
                if (init, name, seed) in runs:
                    continue
                if evaluator is None:  # the model is loaded only when a run is not done yet
                    budget = next(iter(budgets_for(resolve_spec(settings.model).spec, settings.training(), Device()).values()))
                    evaluator = build_evaluator(compile_request(settings, budget, "layer", args.out))
                log.info("%s from %s, seed %d", name, init, seed)
                measurement = evaluator.measure_plan(plan, seed)
                run = {"init": init, "plan": name, "seed": seed, "learning_rate": settings.learning_rate,
                       "loss": measurement.loss, "se": measurement.scores.se, "by_task": measurement.scores.losses(),
                       "wall_s": measurement.wall_s}
                runs[(init, name, seed)] = run
                with journal.open("a") as handle:
                    handle.write(json.dumps(run) + "\n")
                (args.out / "init-gain.md").write_text(table(runs, inits, seeds, plan_names) + "\n")
        del evaluator
    report = table(runs, inits, seeds, plan_names)
    (args.out / "init-gain.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
