"""Search efficiency on a recorded fidelity table: evaluations until a near-optimal config is found.

    python experiments/bench_search.py --synthetic            # a seeded synthetic table (seconds to minutes)
    python experiments/bench_search.py --table experiments/data/fidelity_table.json   # a recorded table

A table maps every config of a small space (config_key, e.g. "4:8,2:16,8:4,3:8") to its top-fidelity
score (held-out loss, lower is better). The file is either that mapping or {"scores": mapping,
"budget": bytes}. Costs come from the memory model of a tiny Llama with one layer per unit
(`qra.testing`), and the budget, unless the file gives one, is the cost of the uniform `--budget-config`.

What is measured: for each strategy and seed, the number of evaluations (every fidelity counts one)
until the strategy scores, at the top fidelity, a config within `--tolerance` (1%) of the best config
within budget. The `cost` columns weigh each evaluation by `--fidelity-costs` instead (by default 0.05,
0.25 and 1 top-fidelity evaluations: a proxy without training, a short fine-tune, the full one), which
is what a multi-fidelity search saves; "every fidelity counts one" ignores that saving. A search that
finds no target within `--max-evaluations` is a failure, left out of the medians and the mean.

Fidelities on a table: the top fidelity returns the table's score; fidelity f below it adds Gaussian
noise of standard deviation `--noise` * |best score| * (top - f) / top, drawn from a generator seeded by
(run seed, fidelity, config), so a config scores the same every time it is asked within one run.

Importance priors are probes on the table, as the priors are measured on a model: a unit's sensitivity to
b bits is the score with that unit alone at b bits (every unit at 8 bits and the smallest rank) minus
the score with none; its plasticity at rank r is the gain of that unit alone at rank r. Probes are not
counted as evaluations.

Synthetic table (`--synthetic`): 4 units x bits {2,3,4,8} x ranks {4,8,16}; with damage d(b) falling
with bits and rank benefit p(r) = log2(r/4)/2, score = 1 + sum_u [s_u d_u (1 - c_u p_u) - g_u p_u]
+ sum_{u<v} w_uv d_u d_v, where s (sensitivity, log-uniform), c (how much rank recovers quantization
damage: the compensation the paper observes), g (plasticity) and w (damage compounding across units)
are drawn from `--table-seed`. The score falls monotonically with more bits and more rank.
"""

import argparse
import itertools
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qra.compiler.importance import Importance
from qra.compiler.space import Config, Gene, SearchSpace, build_space, config_key, parse_config_key
from qra.compiler.strategies import STRATEGIES, Problem, SearchResult, run_search
from qra.plans.schema import Device, Training
from qra.testing import tiny_spec

log = logging.getLogger("bench_search")

DAMAGE = {2: 1.0, 3: 0.35, 4: 0.12, 8: 0.01}
SYNTHETIC_BITS = (2, 3, 4, 8)
SYNTHETIC_RANKS = (4, 8, 16)
SYNTHETIC_UNITS = 4


def synthetic_table(seed: int) -> dict[str, float]:
    """The seeded additive-plus-interaction model of the module docstring, over every config."""
    rng = np.random.default_rng(seed)
    n = SYNTHETIC_UNITS
    sensitivity = np.exp(rng.uniform(math.log(0.05), math.log(0.8), n))
    compensation = rng.uniform(0.2, 0.6, n)
    plasticity = rng.uniform(0.01, 0.08, n)
    compounding = np.triu(rng.uniform(0.0, 0.3, (n, n)) * np.sqrt(np.outer(sensitivity, sensitivity)), 1)
    genes = [Gene(b, r) for b in SYNTHETIC_BITS for r in SYNTHETIC_RANKS]
    table = {}
    for config in itertools.product(genes, repeat=n):
        d = np.array([DAMAGE[g.bits] for g in config])
        p = np.array([math.log2(g.rank / 4) / 2 for g in config])
        score = 1.0 + sensitivity @ (d * (1 - compensation * p)) - plasticity @ p + d @ compounding @ d
        table[config_key(config)] = float(score)
    return table


def load_table(path: Path) -> tuple[dict[str, float], int | None]:
    data = json.loads(path.read_text())
    if "scores" in data:
        return {k: float(v) for k, v in data["scores"].items()}, data.get("budget")
    return {k: float(v) for k, v in data.items()}, None


def table_space(table: dict[str, float]) -> SearchSpace:
    configs = [parse_config_key(key) for key in table]
    bits = sorted({g.bits for c in configs for g in c})
    ranks = sorted({g.rank for c in configs for g in c})
    expected = (len(bits) * len(ranks)) ** len(configs[0])
    if len(set(configs)) != expected:
        raise SystemExit(f"the table holds {len(set(configs))} configs; a search may ask for any of the {expected} "
                         f"of {len(configs[0])} units x bits {bits} x ranks {ranks}")
    return build_space(tiny_spec("llama", layers=len(configs[0])), bits, ranks,
                       Training(seq_len=32, batch_size=1), Device(kind="cpu", context_bytes=0))


def probe_priors(space: SearchSpace, table: dict[str, float]) -> Importance:
    """Stage 1 on the table: one unit at a time, against every unit at the top bits and smallest rank."""
    top_bits, low_rank = space.bits[-1], space.ranks[0]
    reference = space.uniform(top_bits, low_rank)
    base = table[config_key(reference)]

    def alone(unit: int, gene: Gene) -> float:
        return table[config_key(reference[:unit] + (gene,) + reference[unit + 1:])]

    n = len(space.units)
    sensitivity = tuple({b: alone(u, Gene(b, low_rank)) - base for b in space.bits} for u in range(n))
    plasticity = tuple({r: base - alone(u, Gene(top_bits, r)) for r in space.ranks} for u in range(n))
    return Importance(sensitivity, plasticity)


@dataclass
class TableObjective:
    """The table at the top fidelity; seeded Gaussian noise below it (module docstring)."""

    table: dict[str, float]
    top: int
    noise_sd: float
    seed: int

    def evaluate(self, config: Config, fidelity: int) -> float:
        score = self.table[config_key(config)]
        if fidelity >= self.top:
            return score
        codes = [gene.bits * 1000 + gene.rank for gene in config]
        rng = np.random.default_rng([self.seed, fidelity, *codes])
        return score + self.noise_sd * (self.top - fidelity) / self.top * float(rng.normal())


@dataclass(frozen=True)
class Outcome:
    evaluations: int | None
    cost: float | None


def first_hit(result: SearchResult, table: dict[str, float], target: float, top: int,
              costs: dict[int, float]) -> Outcome:
    spent = 0.0
    for record in result.history:
        spent += costs[record.fidelity]
        if record.fidelity == top and table[config_key(record.config)] <= target:
            return Outcome(record.index + 1, spent)
    return Outcome(None, None)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(outcomes: dict[str, list[Outcome]], seeds: int) -> str:
    """The markdown table: medians and means over the seeds that found a target config."""
    random_runs = outcomes.get("random", [])
    random_evaluations = _median([o.evaluations for o in random_runs if o.evaluations is not None])
    random_cost = _median([o.cost for o in random_runs if o.cost is not None])
    lines = ["| strategy | median evaluations | mean evaluations | successes/seeds | ratio vs random "
             "| median cost | cost ratio vs random |", "|---|---|---|---|---|---|---|"]
    for name, runs in outcomes.items():
        evaluations = [o.evaluations for o in runs if o.evaluations is not None]
        cost = _median([o.cost for o in runs if o.cost is not None])
        median = _median(evaluations)
        cells = [
            name,
            f"{median:.1f}" if median is not None else "—",
            f"{statistics.mean(evaluations):.1f}" if evaluations else "—",
            f"{len(evaluations)}/{seeds}",
            f"{median / random_evaluations:.2f}" if median is not None and random_evaluations else "—",
            f"{cost:.2f}" if cost is not None else "—",
            f"{cost / random_cost:.2f}" if cost is not None and random_cost else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", type=Path, help="JSON: config_key -> top-fidelity score (or {scores, budget})")
    source.add_argument("--synthetic", action="store_true", help="a seeded synthetic table (module docstring)")
    parser.add_argument("--table-seed", type=int, default=0)
    parser.add_argument("--strategies", default="autoqra,random,bo,evolution")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-evaluations", type=int, default=120)
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="relative distance to the best that counts as found")
    parser.add_argument("--budget-config", default="4:8", help="BITS:RANK; the budget is this uniform config's cost")
    parser.add_argument("--fidelities", type=int, default=3, help="fidelity ladder 0..N-1")
    parser.add_argument("--fidelity-costs", default="0.05,0.25,1", help="cost of one evaluation per fidelity")
    parser.add_argument("--noise", type=float, default=0.02, help="noise at fidelity 0, relative to |best|")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qra").setLevel(logging.WARNING)

    table, budget = load_table(args.table) if args.table else (synthetic_table(args.table_seed), None)
    space = table_space(table)
    if budget is None:
        bits, rank = (int(v) for v in args.budget_config.split(":"))
        budget = space.cost(space.uniform(bits, rank))
    fidelities = tuple(range(args.fidelities))
    costs = dict(zip(fidelities, (float(c) for c in args.fidelity_costs.split(","))))
    feasible = {key: score for key, score in table.items() if space.cost(parse_config_key(key)) <= budget}
    best_key = min(feasible, key=feasible.__getitem__)
    best = feasible[best_key]
    target = best + args.tolerance * abs(best)
    near = sum(1 for score in feasible.values() if score <= target)
    problem = Problem(space, probe_priors(space, table), budget, fidelities)
    log.info("%d configs, %d within the budget of %s bytes, best %s = %.4f, %d within %.1f%%",
             len(table), len(feasible), f"{budget:,}", best_key, best, near, 100 * args.tolerance)

    outcomes: dict[str, list[Outcome]] = {}
    for name in args.strategies.split(","):
        outcomes[name] = []
        for seed in range(args.seeds):
            objective = TableObjective(table, fidelities[-1], args.noise * abs(best), seed)
            result = run_search(STRATEGIES[name](problem, seed), objective, args.max_evaluations)
            outcomes[name].append(first_hit(result, table, target, fidelities[-1], costs))
            found = outcomes[name][-1]
            log.info("%s seed %d: %s", name, seed,
                     f"found after {found.evaluations} evaluations (cost {found.cost:.2f})" if found.evaluations
                     else "not found")
    sys.stdout.write(
        f"{len(space.units)} units x bits {list(space.bits)} x ranks {list(space.ranks)}; {len(feasible)} of "
        f"{len(table)} configs within budget; target: within {100 * args.tolerance:g}% of {best:.4f} "
        f"({near} configs); at most {args.max_evaluations} evaluations; {args.seeds} seeds\n\n"
    )
    sys.stdout.write(report(outcomes, args.seeds) + "\n")


if __name__ == "__main__":
    main()
