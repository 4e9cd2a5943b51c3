"""What a compile costs, in fine-tunes of the plan it emits: the target is a quick compile at most 10 times
one fine-tune of the plan's schedule, the standard effort at most 30 times.

    python benchmarks/bench_compile.py --out runs/bench-compile            # SmolLM2, quick effort, from cold

Bits, ranks and granularity default to `qra compile`'s (the effort's granularity), so the default run is
the README's Quick start compile.

Measured in one run, on this machine: the wall time of `qra compile` from a cold start (a new, empty
`--work`: the quantization cache and the priors are built from nothing), stage by stage (loading the model
and calibrating, the priors, the search, the final paired comparison), and the wall time of one fine-tune of
the emitted plan's whole schedule through the same `Run` the compile scores candidates with (cached GPTQ
weights, every held-out sequence scored): the mean over every such fine-tune in the run, the plan's own runs
in the final comparison (its fresh seeds, timed in their journals; none when the top rung is truncated) and
`--fine-tunes` more after the compile (2 by default). Both periods count because this machine's speed drifts
within a run: the plan's runs have taken 66-68 s during a compile and 58-59 s after it. With `--workers N`
the compile runs its candidates on N local Ray workers (`qra compile --workers`), each with its share of the
cores: the plan's runs there ran beside others on fewer threads, so the baseline is then the fine-tunes after
the compile alone, in this process, as a user's fine-tune runs.
Prints a table with the ratio and writes OUT/compile-cost.json and OUT/compile-cost.md. Run it with nothing
else on the machine: two cores halve under any other job.
"""

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qra.benchmark import Settings, budgets_for
from qra.compiler.compile import EFFORTS, CompileOutcome, CompileRequest, Prepared, compile_plan, prepare, seed_journal
from qra.compiler.progress import StageProgress
from qra.compiler.space import config_key
from qra.files import write_text
from qra.plans.schema import Device, Training
from qra.plans.spec import resolve_spec
from qra.runtime.data import load_dataset, training_for
from qra.units import format_seconds

log = logging.getLogger("bench_compile")
TARGETS = {"quick": 10, "standard": 30}


@dataclass
class StageTimes:
    """Wall seconds of each stage, from the compile's own progress reports: a stage runs from its first
    report (each stage reports its start, done 0) to the first report of the next."""

    began: float = field(default_factory=time.perf_counter)
    order: list[str] = field(default_factory=list)
    starts: dict[str, float] = field(default_factory=dict)

    def __call__(self, progress: StageProgress) -> None:
        if progress.stage not in self.starts:
            self.starts[progress.stage] = time.perf_counter()
            self.order.append(progress.stage)

    def seconds(self, ended: float) -> dict[str, float]:
        marks = [("load and calibrate", self.began)] + [(stage, self.starts[stage]) for stage in self.order]
        ends = [at for _, at in marks[1:]] + [ended]
        return {name: round(end - start, 1) for (name, start), end in zip(marks, ends)}


def measure(args: argparse.Namespace) -> dict:
    training = Training(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, learning_rate=args.learning_rate)
    # the quality benchmark's B1: uniform 4-bit rank 8's footprint on this data's batches
    budget = budgets_for(resolve_spec(args.model).spec, training_for(training, load_dataset(args.data)), Device())["B1"]
    work = args.out / f"work-{args.effort}-{args.granularity}"
    shutil.rmtree(work, ignore_errors=True)  # from cold: nothing cached
    request = CompileRequest(
        model=args.model, budget=budget, data=args.data, bits=tuple(args.bits), ranks=tuple(args.ranks),
        granularity=args.granularity, effort=args.effort, training=training, work=work,
        journal=args.out / f"plan-{args.effort}-{args.granularity}.journal.jsonl", workers=args.workers,
    )
    request.journal.unlink(missing_ok=True)
    for seeded in request.journal.parent.glob(f"{request.journal.stem}.*"):
        seeded.unlink()
    stages = StageTimes()
    prepared = prepare(request, on_stage=stages)
    outcome = compile_plan(request, prepared=prepared, on_stage=stages)
    compile_s = time.perf_counter() - stages.began
    by_stage = stages.seconds(time.perf_counter())
    log.info("compile: %s; one fine-tune of the plan next", format_seconds(compile_s))
    fine_tunes_s = []
    for _ in range(args.fine_tunes):
        began = time.perf_counter()
        evaluation = prepared.evaluator.measure_plan(outcome.plan, seed=0)
        fine_tunes_s.append(time.perf_counter() - began)
    final_runs_s = plan_runs_s(request, prepared, outcome)
    fine_tune_s = statistics.fmean(final_runs_s + fine_tunes_s)
    return {
        "model": args.model, "data": args.data, "budget": budget.text, "effort": args.effort, "granularity": args.granularity,
        "schedule": f"{args.steps} steps, batch {args.batch_size} x {args.seq_len}, learning rate {args.learning_rate:g}",
        "workers": args.workers, "stages_s": by_stage, "compile_s": compile_s, "fine_tune_s": fine_tune_s, "fine_tunes_s": fine_tunes_s,
        "final_runs_s": final_runs_s,
        "fine_tune_loss": evaluation.loss, "ratio": compile_s / fine_tune_s, "target": TARGETS.get(args.effort),
        "evaluations": outcome.plan.provenance.evaluations, "quantization_cache": str(prepared.evaluator.cache.stats),
    }


def plan_runs_s(request: CompileRequest, prepared: Prepared, outcome: CompileOutcome) -> list[float]:
    """Wall seconds of the plan's own runs in the final comparison, from its seeds' journals: whole fine-tunes
    of the plan's schedule unless the effort truncated the top rung or they ran on workers (then none)."""
    if prepared.evaluator.ladder.truncated or request.workers or request.ray_address:
        return []
    pick, top = outcome.pick, prepared.problem.top
    key = config_key(pick.config)
    return [record.seconds for seed in pick.seeds_of(pick.config) for record in seed_journal(request, prepared, seed).records
            if record.config == key and record.fidelity == top and math.isfinite(record.score)]


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['data']}, budget {result['budget']}, `--effort {result['effort']}`, granularity "
        f"{result['granularity']}, schedule {result['schedule']}; from a cold start"
        f"{_workers_note(result.get('workers', 0))}.",
        "",
        "| stage | wall | in fine-tunes |",
        "|---|---|---|",
    ]
    for stage, seconds in result["stages_s"].items():
        lines.append(f"| {stage} | {format_seconds(seconds)} | {seconds / result['fine_tune_s']:.1f}x |")
    lines.append(f"| **compile** | **{format_seconds(result['compile_s'])}** | **{result['ratio']:.1f}x** |")
    lines.append(f"| one fine-tune of the plan (baseline{_baseline_note(result)}) | {format_seconds(result['fine_tune_s'])} | 1.0x |")
    if result["target"] is not None:
        verdict = "met" if result["ratio"] <= result["target"] else f"missed by {result['ratio'] - result['target']:.1f} fine-tunes"
        lines += ["", f"Target: at most {result['target']}x one fine-tune: {verdict}."]
    return "\n".join(lines) + "\n"


def _workers_note(workers: int) -> str:
    return f", candidates on {workers} Ray worker(s) (`--workers {workers}`)" if workers else ""


def _listed(times: list[float]) -> str:
    return ", ".join(format_seconds(seconds) for seconds in times)


def _baseline_note(result: dict) -> str:
    """Which fine-tunes the baseline is the mean of: the plan's runs in the final comparison, and those after."""
    during, after = result.get("final_runs_s", []), result.get("fine_tunes_s", [result["fine_tune_s"]])
    if len(during) + len(after) < 2:
        return ""
    parts = [f"its {len(during)} run(s) in the final comparison: {_listed(during)}"] if during else []
    parts.append(f"{len(after)} after the compile: {_listed(after)}")
    return f", mean of {len(during) + len(after)}: {'; '.join(parts)}"


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compile"))
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--data", default=defaults.data)
    parser.add_argument("--effort", default="quick", choices=("quick", "standard", "thorough"))
    parser.add_argument("--granularity", choices=("layer", "module"), help="default: the effort's, as `qra compile`")
    parser.add_argument("--fine-tunes", type=int, default=2, help="fine-tunes of the plan measured; the baseline is their mean")
    parser.add_argument("--bits", type=int, nargs="+", default=list(CompileRequest.bits))
    parser.add_argument("--ranks", type=int, nargs="+", default=list(CompileRequest.ranks))
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--workers", type=int, default=0, help="run the compile's candidates on this many local Ray workers")
    args = parser.parse_args()
    if args.fine_tunes < 1:
        parser.error("--fine-tunes must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be 0 (in this process) or more")
    args.granularity = args.granularity or EFFORTS[args.effort].granularity
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    table = markdown(result)
    write_text(args.out / "compile-cost.json", json.dumps(result, indent=2))
    write_text(args.out / "compile-cost.md", table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
