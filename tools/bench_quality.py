"""Quality at equal memory on a real model: the autoqra plan against the pipelines it claims to beat.

    python tools/bench_quality.py --out runs/bench-quality --ship plans --report docs/results

For each budget (by default the memory model's footprint of uniform 4-bit rank 8 and of uniform 3-bit
rank 8, at the benchmark's training settings, rounded up to 0.1 MB) it builds five plans and fine-tunes
each under the same training settings and steps, once per seed:

- autoqra: `qra compile` (priors, evolution with a surrogate, trust-region BO, repair) at that budget;
- uniform: one bit-width and one rank for every layer, at or under the budget (QLoRA-style);
- sequential: bits allocated by measured quantization sensitivity under the budget, then one rank
  (LQ-LoRA-style);
- heuristic: first and last layers one bit-width step up, the rest uniform, repaired (llama.cpp-style);
- 16-bit: LoRA rank 8 on the unquantized model, the quality ceiling (its own footprint, shared by budgets).

The baselines are built from the same priors and search space as the compile. Every fine-tune is
`qra materialize` (adapter only) with a shared quantization cache, so each plan is GPTQ-quantized once
and its seeds differ only in LoRA initialisation and batch order (the data is generated and split with
seed 0 for every run, as the compile's was). The data is the two demo tasks joined
(`python-reference+arithmetic`); each run reports the held-out loss of each task on its own, exact
match on held-out arithmetic, and the measured peak (on CPU: the measured persistent terms plus the
memory model's transient terms and overhead, see `qra.runtime.footprint.memory_report`). With
`--fine-tune evaluator` the peak is measured once per plan by `qra.runtime.footprint.measure_plan_footprint`
(one training step of the plan's packed modules, zero-filled: memory depends on shapes, not values).

Gap closed = (uniform loss - method loss) / (uniform loss - 16-bit loss), on the mean of the two tasks'
held-out losses, from seed means. Every stage is resumable: a rerun skips finished compiles and runs.
Writes OUT/quality.json, OUT/quality.md, OUT/quality.png and OUT/plan-<budget>.png; `--report DIR` copies
them there, `--ship DIR` copies the autoqra plans there as `<model>-<budget>.yaml`.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from qra.compiler.compile import CompileRequest, Prepared, baseline_plan, compile_plan, prepare
from qra.compiler.fidelity import FidelityEvaluator
from qra.compiler.space import Gene
from qra.models import load_config, load_model, resolve_model
from qra.plans.build import uniform_plan
from qra.plans.io import load_plan, save_plan
from qra.plans.memory import estimate_memory, uniform_settings
from qra.plans.plot import bits_rank_pattern, plot_plan
from qra.plans.schema import Budget, Device, Plan, Training
from qra.plans.spec import spec_from_config
from qra.runtime.data import batches, held_out_batches_by_task, load_dataset, pad_id, training_features
from qra.runtime.footprint import measure_plan_footprint
from qra.runtime.materialize import MaterializeRequest, held_out_exact_match, materialize
from qra.runtime.train import held_out_loss, train_lora

log = logging.getLogger("bench_quality")

METHODS = ("autoqra", "uniform", "sequential", "heuristic")
CEILING = "16-bit"
CEILING_RANK = 8
BUDGET_RANK = 8
TASKS = ("python-reference", "arithmetic")


@dataclass(frozen=True)
class Settings:
    model: str
    data: str
    seq_len: int
    batch_size: int
    steps: int
    effort: str
    seeds: tuple[int, ...]
    exact_match_examples: int
    held_out_batches: int

    def training(self, seed: int = 0) -> Training:
        return Training(seq_len=self.seq_len, batch_size=self.batch_size, steps=self.steps, seed=seed)


def budget_for(spec, bits: int, training: Training, device: Device, rank: int = BUDGET_RANK) -> Budget:
    """The footprint of uniform `bits` at `rank`, rounded up to 0.1 MB, as a budget."""
    footprint = estimate_memory(spec, uniform_settings(bits, rank), training, device).total_bytes
    megabytes = math.ceil(footprint / 10**5) / 10
    return Budget(bytes=int(megabytes * 10**6), text=f"{megabytes:.1f}MB")


def plan_name(settings: Settings, budget: Budget) -> str:
    return f"{settings.model}-{budget.text}"


def compile_request(settings: Settings, budget: Budget, out: Path) -> CompileRequest:
    plans = out / "plans"
    return CompileRequest(
        model=settings.model, budget=budget, data=settings.data, effort=settings.effort, training=settings.training(),
        journal=plans / f"{plan_name(settings, budget)}.yaml.journal.jsonl", work=out / "work", resume=True,
    )


def _timed(timings: dict, key: str, action):
    began = time.perf_counter()
    result = action()
    timings[key] = round(time.perf_counter() - began, 1)
    return result


def plans_at(settings: Settings, budget: Budget, out: Path, timings: dict) -> tuple[dict[str, Plan], Prepared | None]:
    """The autoqra plan (compiled, or loaded when a previous run wrote it) and the baselines' plans, with
    the prepared compile when one was needed to make them."""
    request = compile_request(settings, budget, out)
    folder = out / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {method: folder / f"{plan_name(settings, budget)}{'' if method == 'autoqra' else '.' + method}.yaml" for method in METHODS}
    if all(path.is_file() for path in paths.values()):
        return {method: load_plan(path) for method, path in paths.items()}, None
    prepared: Prepared = _timed(timings, f"prepare at {budget.text} (priors measured, or replayed from OUT/work)", lambda: prepare(request))
    if not paths["autoqra"].is_file():
        outcome = _timed(timings, f"search at {budget.text}", lambda: compile_plan(request, prepared=prepared))
        save_plan(outcome.plan, paths["autoqra"])
    for method in METHODS[1:]:
        save_plan(baseline_plan(request, prepared, method), paths[method])
    return {method: load_plan(path) for method, path in paths.items()}, prepared


def ceiling_plan(settings: Settings, reference: Plan, spec) -> Plan:
    """LoRA rank 8 on the unquantized model; its budget is its own footprint."""
    training, device = settings.training(), reference.device
    budget = budget_for(spec, 16, training, device, CEILING_RANK)
    return uniform_plan(spec, reference.model, budget, 16, CEILING_RANK, training=training, device=device)


def plan_key(plan: Plan) -> str:
    """What a fine-tune's result depends on in a plan: its layers and training settings (the seed aside)."""
    identity = [[layer.model_dump() for layer in plan.layers], plan.training.model_dump(exclude={"seed"})]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _finished(run: Path, results_file: Path, plan: Plan) -> dict | None:
    """The saved results of this plan's run; a run of another plan in `run` (a plan that was compiled
    again since) is removed, so that it is run afresh."""
    if not results_file.is_file():
        return None
    results = json.loads(results_file.read_text())
    if results.get("plan") == plan_key(plan):
        return results
    shutil.rmtree(run)
    return None


def _save(results_file: Path, plan: Plan, results: dict) -> dict:
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results = {"plan": plan_key(plan), **results}
    _write(results_file, json.dumps(results, indent=2, default=str))
    return results


def run_materialize(settings: Settings, plan: Plan, seed: int, folder: Path, cache: Path) -> dict:
    """One fine-tune through `qra materialize` (packed GPTQ modules, measured peak); skipped when done."""
    if (done := _finished(folder, folder / "bench" / "results.json", plan)) is not None:
        return done
    seeded = plan.model_copy(update={"training": plan.training.model_copy(update={"seed": seed})})
    request = MaterializeRequest(
        plan=seeded, output=folder, data=settings.data, data_seed=0, model=settings.model, resume=folder.exists(), cache=cache,
        held_out_batches=settings.held_out_batches, exact_match_examples=settings.exact_match_examples,
    )
    log.info("fine-tuning %s, seed %d (materialize)", folder.parent, seed)
    results = materialize(request)
    return _save(folder / "bench" / "results.json", plan, {
        "seed": seed, "held_out_by_task": results["held_out_by_task"], "exact_match": results["exact_match"],
        "peak_bytes": results["memory"]["measured_peak_bytes"], "peak": "measured", "train_s": results["wall_s"]["train"],
    })


def measured_footprint(settings: Settings, plan: Plan, spec, folder: Path) -> dict:
    """The plan's measured peak (`measure_plan_footprint` on a fresh copy of the model), once per plan."""
    path = folder / "footprint.json"
    if path.is_file() and (saved := json.loads(path.read_text())).get("plan") == plan_key(plan):
        return saved
    log.info("measuring the training step's footprint of %s", folder)
    model, _ = load_model(resolve_model(settings.model), plan.training.compute_dtype)
    report = measure_plan_footprint(plan, spec, model)
    return _save(path, plan, {"peak_bytes": report["measured_peak_bytes"], "memory": report})


class EvaluatorRuns:
    """Fine-tunes on the compile's evaluator: the float model with each module's GPTQ weight from the
    quantization cache swapped in (gptqmodel's own GPTQ, the values the packed module dequantizes to), LoRA
    attached and trained by the runtime's `attach_lora` / `train_lora` under the plan's training settings, in
    the fastest dtype of this CPU. The peak is measured apart, once per plan (`measured_footprint`)."""

    def __init__(self, evaluator: FidelityEvaluator, settings: Settings) -> None:
        self.evaluator = evaluator
        self.settings = settings
        tokenizer = evaluator.tokenizer
        self.pad = pad_id(tokenizer)
        dataset = load_dataset(settings.data, seed=0)
        self.train = training_features(dataset.train, tokenizer, settings.seq_len)
        self.held_out = held_out_batches_by_task(dataset, tokenizer, settings.seq_len, settings.batch_size, 0, settings.held_out_batches)
        self.answers = [example for example in dataset.held_out if not example.is_text]

    def run(self, plan: Plan, spec, seed: int, folder: Path) -> dict:
        results = _finished(folder, folder / "results.json", plan) or self._fine_tune(plan, seed, folder)
        footprint = measured_footprint(self.settings, plan, spec, folder.parent)
        return {**results, "peak_bytes": footprint["peak_bytes"], "peak": "measured"}

    def _fine_tune(self, plan: Plan, seed: int, folder: Path) -> dict:
        log.info("fine-tuning %s, seed %d (evaluator)", folder.parent, seed)
        evaluator, training = self.evaluator, plan.training.model_copy(update={"seed": seed})
        config = tuple(Gene(layer.bits, layer.rank) for layer in plan.layers)
        order = batches(self.train, training.batch_size, seed, 0, self.pad)
        evaluator.seed = seed
        began = time.perf_counter()
        with evaluator.quantized(config), evaluator.adapted(config) as peft_model:
            train_lora(peft_model, training, lambda step, micro: order[step % len(order)], measure=False)
            train_s = time.perf_counter() - began
            losses = {task: held_out_loss(peft_model, held_out) for task, held_out in self.held_out.items()}
            exact = held_out_exact_match(peft_model, evaluator.tokenizer, self.answers, self.settings.exact_match_examples)
        return _save(folder / "results.json", plan, {"seed": seed, "held_out_by_task": losses, "exact_match": exact, "train_s": train_s})


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each reported quantity."""

    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}

    task_losses = {task: [run["held_out_by_task"][task] for run in runs] for task in TASKS}
    mean_loss = [statistics.fmean(run["held_out_by_task"][task] for task in TASKS) for run in runs]
    return {
        "loss": stats(mean_loss),
        **{f"loss {task}": stats(values) for task, values in task_losses.items()},
        "exact_match": stats([run["exact_match"] for run in runs]),
        "peak_bytes": max(run["peak_bytes"] for run in runs),
        "peak": runs[0]["peak"],
        "train_s": stats([run["train_s"] for run in runs]),
        "seeds": len(runs),
    }


def gap_closed(method: float, uniform: float, ceiling: float) -> float | None:
    gap = uniform - ceiling
    return (uniform - method) / gap if gap > 0 else None


def verdicts(rows: dict[str, dict]) -> dict:
    """The issue's targets at one budget: autoqra below uniform and sequential beyond the seed spread
    (mean + std below the other's mean - std; undecided, None, with fewer than 2 seeds), and at least half of
    the uniform-to-16-bit gap closed."""
    auto = rows["autoqra"]["loss"]

    def beyond(other: str) -> bool | None:
        if min(rows["autoqra"]["seeds"], rows[other]["seeds"]) < 2:
            return None
        theirs = rows[other]["loss"]
        return auto["mean"] + auto["std"] < theirs["mean"] - theirs["std"]

    closed = rows["autoqra"]["gap_closed"]
    return {
        "beats_uniform_beyond_spread": beyond("uniform"),
        "beats_sequential_beyond_spread": beyond("sequential"),
        "closes_half_the_gap": closed is not None and closed >= 0.5,
    }


def compile_scores(plan: Plan) -> dict:
    """What the compile itself measured: the plan's predicted score and the uniform baseline's, at the
    search's top fidelity (its short fine-tune), to set beside the full fine-tunes' results."""
    return {"fidelity": plan.predicted.fidelity, "autoqra": plan.predicted.score, **plan.provenance.baselines}


def markdown(report: dict) -> str:
    lines = [
        f"Model {report['model']}, data {report['data']}, {report['steps']} steps at batch {report['batch_size']} x "
        f"{report['seq_len']} tokens, seeds {', '.join(map(str, report['seeds']))}; mean ± std over seeds; gap closed: "
        "the share of the held-out loss gap between uniform and 16-bit that a method recovers.",
        "",
        "| budget | method | seeds | peak | loss (mean of tasks) | python-reference | arithmetic | exact match | gap closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for budget, block in report["budgets"].items():
        for method, row in block["rows"].items():
            closed = row.get("gap_closed")
            lines.append(
                f"| {budget} | {method} | {row['seeds']} | {row['peak_bytes'] / 1e6:.1f} MB ({row['peak']}) | {_pm(row['loss'])} | "
                f"{_pm(row['loss python-reference'])} | {_pm(row['loss arithmetic'])} | "
                f"{row['exact_match']['mean']:.1%} ± {row['exact_match']['std']:.1%} | "
                f"{'' if closed is None else f'{closed:.0%}'} |"
            )
    lines.append("")
    for budget, block in report["budgets"].items():
        answers = {True: "yes", False: "no", None: "undecided (fewer than 2 seeds)"}
        met = ", ".join(f"{name.replace('_', ' ')}: {answers[ok]}" for name, ok in block["targets"].items())
        scores = block.get("compile_scores")
        measured = "" if not scores else " The compile's own scores at {}: {}.".format(
            scores["fidelity"], ", ".join(f"{name} {score:.4f}" for name, score in scores.items() if name != "fidelity")
        )
        lines.append(f"- {budget}: {met}. autoqra plan: {block['pattern']}.{measured}")
    return "\n".join(lines) + "\n"


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def plot_quality(report: dict, path: Path) -> None:
    """Quality (mean held-out loss) against measured peak memory, one point per method and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"autoqra": "*", "uniform": "o", "sequential": "s", "heuristic": "^", CEILING: "D"}
    colours = dict(zip(report["budgets"], ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for budget, block in report["budgets"].items():
        for method, row in block["rows"].items():
            colour = "black" if method == CEILING else colours[budget]
            axis.errorbar(row["peak_bytes"] / 1e6, row["loss"]["mean"], yerr=row["loss"]["std"], fmt=markers[method],
                          color=colour, markersize=10 if method == "autoqra" else 6, capsize=3,
                          label=f"{method} @ {budget}" if method != CEILING else CEILING)
        axis.axvline(block["budget_bytes"] / 1e6, color=colours[budget], linestyle=":", linewidth=1)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
    kinds = sorted({row["peak"] for block in report["budgets"].values() for row in block["rows"].values()})
    axis.set_xlabel(f"peak memory, {' / '.join(kinds)} (MB); dotted: budget")
    axis.set_ylabel("held-out loss, mean of the two tasks (lower is better)")
    axis.set_title(f"{report['model']}: quality at equal memory ({len(report['seeds'])} seeds, mean ± std)", fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    staging = path.with_name(path.name + ".tmp.png")
    figure.savefig(staging, dpi=120)
    plt.close(figure)
    os.replace(staging, path)


def _write(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="python-reference+arithmetic")
    parser.add_argument("--budget-bits", default="4,3", help="budgets: the footprint of uniform BITS at rank 8, for each")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--effort", default="quick")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--exact-match-examples", type=int, default=50)
    parser.add_argument("--held-out-batches", type=int, default=8)
    parser.add_argument("--fine-tune", choices=("materialize", "evaluator"), default="materialize",
                        help="materialize: qra materialize (packed GPTQ modules, measured peak); evaluator: the compile's "
                        "evaluator (cached GPTQ weights in the float model, the fastest dtype of this CPU; the peak "
                        "measured apart on zero-filled packed modules)")
    parser.add_argument("--ship", type=Path, help="copy the autoqra plans here as <model>-<budget>.yaml")
    parser.add_argument("--report", type=Path, help="copy the table, JSON and plots here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings(
        args.model, args.data, args.seq_len, args.batch_size, args.steps, args.effort,
        tuple(int(s) for s in args.seeds.split(",")), args.exact_match_examples, args.held_out_batches,
    )
    run_benchmark(settings, [int(b) for b in args.budget_bits.split(",")], args.out, args.ship, args.report, args.fine_tune)


def run_benchmark(
    settings: Settings, budget_bits: list[int], out: Path, ship: Path | None, report_dir: Path | None, fine_tune: str = "materialize"
) -> dict:
    """Compile every budget's plans first, then fine-tune seed by seed (every method and budget at one seed
    before the next seed), rewriting the report after each round, so a partial run reports every budget."""
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    spec = spec_from_config(load_config(resolve_model(settings.model)))
    budgets = [budget_for(spec, bits, settings.training(), Device()) for bits in budget_bits]
    plans, prepared = {}, None
    for budget in budgets:
        plans[budget.text], prepared = plans_at(settings, budget, out, timings)
        _write(timings_file, json.dumps(timings, indent=2))
        plot_plan(plans[budget.text]["autoqra"], spec, out / f"plan-{budget.text}.png")
        if ship is not None:
            name = f"{plan_name(settings, budget)}.yaml"
            shutil.copyfile(out / "plans" / name, ship / name)
    ceiling = ceiling_plan(settings, plans[budgets[0].text]["uniform"], spec)
    runs: dict[tuple[str, str], list[dict]] = {}
    cache = out / "cache"
    if fine_tune == "evaluator":
        evaluator = (prepared or prepare(compile_request(settings, budgets[0], out))).evaluator
        on_evaluator = EvaluatorRuns(evaluator, settings)

    def run_one(plan: Plan, seed: int, folder: Path) -> dict:
        if fine_tune == "evaluator":
            return on_evaluator.run(plan, spec, seed, folder)
        return run_materialize(settings, plan, seed, folder, cache)
    for seed in settings.seeds:
        for budget in budgets:
            for method, plan in plans[budget.text].items():
                folder = out / "runs" / budget.text / method / f"seed{seed}"
                runs.setdefault((budget.text, method), []).append(run_one(plan, seed, folder))
        runs.setdefault(("", CEILING), []).append(run_one(ceiling, seed, out / "runs" / CEILING / f"seed{seed}"))
        report = _report(settings, budgets, budget_bits, plans, runs, spec, timings, fine_tune)
        _write(out / "quality.json", json.dumps(report, indent=2))
        _write(out / "quality.md", markdown(report))
        plot_quality(report, out / "quality.png")
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            for name in ["quality.json", "quality.md", "quality.png", *(f"plan-{b.text}.png" for b in budgets)]:
                shutil.copyfile(out / name, report_dir / name)
        log.info("seed %d done for every method and budget: %s", seed, out / "quality.md")
    return report


def _report(
    settings: Settings, budgets: list[Budget], budget_bits: list[int], plans: dict, runs: dict, spec, timings: dict, fine_tune: str
) -> dict:
    report = {
        "model": settings.model, "data": settings.data, "seq_len": settings.seq_len, "batch_size": settings.batch_size,
        "steps": settings.steps, "seeds": sorted({run["seed"] for group in runs.values() for run in group}),
        "effort": settings.effort, "fine_tune": fine_tune, "budgets": {}, "timings_s": timings,
    }
    for budget, bits in zip(budgets, budget_bits):
        rows = {method: summarize(runs[(budget.text, method)]) for method in METHODS}
        rows[CEILING] = summarize(runs[("", CEILING)])
        for row in rows.values():
            row["gap_closed"] = gap_closed(row["loss"]["mean"], rows["uniform"]["loss"]["mean"], rows[CEILING]["loss"]["mean"])
        compiled = plans[budget.text]["autoqra"]
        pattern = bits_rank_pattern(compiled, spec)
        report["budgets"][budget.text] = {
            "budget_bytes": budget.bytes, "uniform_bits": bits, "rows": rows, "targets": verdicts(rows),
            "pattern": pattern.describe(), "lower_bits_higher_rank": pattern.lower_bits_higher_rank,
            "autoqra_compile_wall_time_s": compiled.provenance.wall_time_s,
            "compile_scores": compile_scores(compiled),
        }
    return report


if __name__ == "__main__":
    main()
