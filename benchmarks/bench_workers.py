"""What workers buy a compile: measured here on a tiny Llama, projected on paper for a 7B on an 8-GPU node.

    python benchmarks/bench_workers.py --out runs/bench-workers      # a few minutes on 2 cores; nothing else running

Measured: one quick compile of a tiny Llama (4 layers, hidden 128) on the Python reference, run three times
on the same warm `--work` (the quantization cache and the priors are built once, before the clock starts):
in this process, on 1 Ray worker and on 2. Each time is the wall time of `compile_plan`: loading the model
and replaying the priors, then the search, the uniform baseline and the final paired comparison, the pool's
start-up included. The table gives the ratios
and whether the three plans are the same.

Projected: the same search (AutoQRA, quick effort, layer granularity) asked for its candidates on
Llama-3-8B's 32 layers at a budget of uniform 4-bit rank 16, answered by a stand-in score (each
configuration's importance lost under flat priors, with seeded noise): which candidates a batch holds, and
at which rung, is what the search asks, whatever the scores. Each candidate costs its rung's steps times the
schedule's tokens per step at a stated training throughput, plus scoring the held-out tokens forward only
(taken as 3x the training throughput). A batch on G GPUs takes the makespan of its candidates dealt
longest-first to G workers; batches run one after another. The throughput is an assumption, not a
measurement (no GPU here): pass yours with --tokens-per-second.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from qra.benchmark import budget_for
from qra.compiler.compile import EFFORTS, CompileRequest, compile_plan, prepare
from qra.compiler.importance import flat_importance
from qra.compiler.space import Config, build_space
from qra.compiler.strategies import AutoQRA, Problem, run_search
from qra.files import write_text
from qra.plans.build import budget_covering
from qra.plans.schema import Device, Training
from qra.plans.spec import resolve_spec
from qra.testing import save_tiny_model, tiny_corpus
from qra.units import format_seconds

log = logging.getLogger("bench_workers")
TINY_TRAINING = Training(seq_len=64, batch_size=4, steps=40, learning_rate=5e-3)
TINY_BITS, TINY_RANKS = (2, 4, 8), (4, 8, 16)
HELD_OUT_SEQUENCES = 256  # a 7B user's held-out set, per task, for the projection


def tiny_request(folder: Path, out: Path, workers: int, name: str) -> CompileRequest:
    spec = resolve_spec(str(folder / "model")).spec
    space = build_space(spec, TINY_BITS, TINY_RANKS, TINY_TRAINING, Device(kind="cpu", context_bytes=0))
    budget = budget_covering(space.cost(space.uniform(4, 8)))
    journal = out / f"{name}.journal.jsonl"
    for stale in out.glob(f"{name}.journal*"):
        stale.unlink()
    return CompileRequest(model=str(folder / "model"), budget=budget, data=str(folder / "corpus.jsonl"), bits=TINY_BITS,
                          ranks=TINY_RANKS, effort="quick", training=TINY_TRAINING, device=Device(kind="cpu", context_bytes=0),
                          journal=journal, work=out / "work", workers=workers)


def measure(out: Path) -> dict:
    folder = out / "tiny"
    if not (folder / "model").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tiny_corpus(folder / "corpus.jsonl", examples=120)
        save_tiny_model(folder / "model", "llama", layers=4)
    prepare(tiny_request(folder, out, 0, "warm-up"))  # the cache and the priors, outside the clock
    runs = {}
    for label, workers in (("in this process", 0), ("1 Ray worker", 1), ("2 Ray workers", 2)):
        request = tiny_request(folder, out, workers, f"workers-{workers}")
        began = time.perf_counter()
        outcome = compile_plan(request)
        runs[label] = {"seconds": round(time.perf_counter() - began, 2), "plan": [layer.model_dump() for layer in outcome.plan.layers],
                       "evaluations": len(outcome.result.history)}
        log.info("%s: %s", label, format_seconds(runs[label]["seconds"]))
    return runs


def _stand_in(problem: Problem, seed: int):
    """The projection's objective: importance lost under flat priors, with seeded noise per config."""

    class StandIn:
        def evaluate(self, config: Config, fidelity: int) -> float:
            noise = np.random.default_rng([seed, fidelity, *(g.bits * 100 + g.rank for g in config)]).normal(0, 0.01)
            return float(problem.importance.total_lost(config) + noise)

    return StandIn()


def makespan(durations: list[float], gpus: int) -> float:
    """Wall time of candidates dealt longest-first to the least loaded of `gpus` workers."""
    loads = [0.0] * gpus
    for duration in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += duration
    return max(loads)


def project(tokens_per_second: float, steps: int, seq_len: int, batch_size: int, gpus: tuple[int, ...],
            effort_name: str = "quick") -> dict:
    spec = resolve_spec("llama-3-8b").spec
    training = Training(seq_len=seq_len, batch_size=batch_size, steps=steps, gradient_checkpointing=True)
    effort = EFFORTS[effort_name]
    ladder = effort.ladder(steps)
    space = build_space(spec, (2, 3, 4, 8), (4, 8, 16, 32), training, Device(), "layer")
    budget = budget_for(spec, 4, training, Device(), rank=16)
    problem = Problem(space, flat_importance(len(space.units), space.bits, space.ranks), budget.bytes,
                      fidelities=tuple(range(ladder.levels)))
    result = run_search(AutoQRA(problem, 0, evolution_share=effort.evolution_share), _stand_in(problem, 0), effort.evaluations)
    tokens_per_step = seq_len * batch_size
    scoring_s = HELD_OUT_SEQUENCES * seq_len / (3 * tokens_per_second)

    def seconds(fidelity: int) -> float:
        return ladder.steps[fidelity] * tokens_per_step / tokens_per_second + scoring_s

    batches: dict[int, list[float]] = {}
    for evaluation in result.history:
        batches.setdefault(evaluation.batch, []).append(seconds(evaluation.fidelity))
    final = [seconds(ladder.levels - 1)] * ((effort.finalists + 1) * effort.seeds)
    walls = {g: sum(makespan(b, g) for b in batches.values()) + makespan(final, g) for g in gpus}
    return {
        "effort": effort_name, "model": "llama-3-8b", "budget": budget.text, "schedule": f"{steps} steps, batch {batch_size} x {seq_len}, checkpointing",
        "ladder_steps": list(ladder.steps), "tokens_per_second": tokens_per_second, "evaluations": len(result.history),
        "batch_sizes": [len(b) for b in batches.values()], "final_runs": len(final),
        "hours": {g: round(wall / 3600, 2) for g, wall in walls.items()},
    }


def markdown(runs: dict, projections: list[dict]) -> str:
    alone = runs["in this process"]["seconds"]
    one = runs["1 Ray worker"]["seconds"]
    same = all(run["plan"] == runs["in this process"]["plan"] for run in runs.values())
    lines = ["Measured here (2 CPU cores), one quick compile of a tiny Llama, warm `--work`:", "",
             "| where candidates run | wall | vs in-process | vs 1 worker |", "|---|---|---|---|"]
    for label, run in runs.items():
        lines.append(f"| {label} | {format_seconds(run['seconds'])} | {run['seconds'] / alone:.2f} | {run['seconds'] / one:.2f} |")
    lines += ["", f"The three plans are {'the same' if same else 'NOT the same'}.", ""]
    first = projections[0]
    lines += [
        f"Projected, not measured: {first['model']} at {first['budget']} (uniform 4-bit r16), {first['schedule']}, "
        f"assuming {first['tokens_per_second']:g} training tokens/s per GPU; the search's batches as it asks them "
        "(evaluations per batch), then the final comparison's runs in one batch:", "",
        "| effort | rungs (steps) | batches | GPUs | candidate runs | speed-up |", "|---|---|---|---|---|---|",
    ]
    for projection in projections:
        hours = projection["hours"]
        base = hours[min(hours)]
        for gpus, value in hours.items():
            lines.append(f"| {projection['effort']} | {projection['ladder_steps']} | {projection['batch_sizes']} + "
                         f"{projection['final_runs']} | {gpus} | {value:.2f} h | {base / value:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-workers"))
    parser.add_argument("--tokens-per-second", type=float, default=2000.0,
                        help="assumed training throughput of one GPU on the 7B (a stated assumption)")
    parser.add_argument("--steps", type=int, default=1000, help="the 7B user's schedule")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-measure", action="store_true", help="only the projection")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    projections = [project(args.tokens_per_second, args.steps, args.seq_len, args.batch_size, (1, 2, 4, 8), effort)
                   for effort in ("quick", "standard")]
    runs = json.loads((args.out / "workers.json").read_text())["runs"] if args.skip_measure else measure(args.out)
    write_text(args.out / "workers.json", json.dumps({"runs": runs, "projections": projections}, indent=2))
    table = markdown(runs, projections)
    write_text(args.out / "workers.md", table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
