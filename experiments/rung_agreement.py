"""How well a lower rung of the fidelity ladder ranks candidates the way the top rung does, from search journals.

    python experiments/rung_agreement.py OUT/plans/*.journal.jsonl   # search journals, e.g. benchmarks/bench_quality.py's
    python experiments/rung_agreement.py J.journal.jsonl --priors WORK/priors/KEY.json   # and the priors' prediction

The top is the highest rung the journal holds (the final comparison's runs are in other journals: a search
that stopped below the top rung is compared with its own highest rung, and a quick compile's, at step 0 only,
has no rung below it). For each journal and each rung below that top: the configurations scored
at both that rung and the top, the Spearman rank correlation of their two scores, and where the lower
rung's best lands at the top (1 = also best there). Only configurations that were promoted have a top-rung
score, so the correlation is over the survivors of the lower rung: it says how well that rung orders
candidates good enough to reach the top, which is what promotion and the refinement's screen ask of it.
Reads the records as written (the journal's key is not checked: any compile's journal will do).

With `--priors`, the priors journal of the compiles the search journals come from (`WORK/priors/*.json`),
each search journal gets one more row: the priors' prediction (`Importance.total_lost`, what the warm start
samples by and what orders finalists chosen at step 0) against the top, over the configurations at the top
(none where the journal's configurations have another number of units than the priors measured).
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import spearmanr

from qra.compiler.priors import importance_from_journal
from qra.compiler.space import parse_config_key


@dataclass(frozen=True)
class Agreement:
    journal: str
    rung: int | None  # None: the priors' prediction
    top: int
    configs: int
    spearman: float
    best_lower_at_top: int  # the lower rung's best config's place at the top (1 = best there too)


def scores_by_config(path: Path) -> dict[str, dict[int, float]]:
    """Every finite score of the journal, by configuration and rung (the header line is skipped)."""
    scores: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines()[1:]:
        record = json.loads(line)
        if record["score"] is not None and math.isfinite(record["score"]):
            scores.setdefault(record["config"], {})[int(record["fidelity"])] = float(record["score"])
    return scores


def _agreement(journal: str, rung: int | None, top: int, lower: list[float], upper: list[float]) -> Agreement:
    place = sorted(upper).index(upper[lower.index(min(lower))]) + 1
    return Agreement(journal, rung, top, len(lower), float(spearmanr(lower, upper)[0]), place)


def agreements(path: Path, priors: Path | None = None) -> list[Agreement]:
    scores = scores_by_config(path)
    rungs = sorted({rung for by_rung in scores.values() for rung in by_rung})
    if not rungs:
        return []
    top, result = rungs[-1], []
    for rung in rungs[:-1]:
        both = [config for config, by_rung in scores.items() if rung in by_rung and top in by_rung]
        if len(both) >= 3:
            result.append(_agreement(path.name, rung, top, [scores[c][rung] for c in both], [scores[c][top] for c in both]))
    at_top = [config for config, by_rung in scores.items() if top in by_rung]
    if priors is None or len(at_top) < 3:
        return result
    configs = {config: parse_config_key(config) for config in at_top}
    bits = sorted({gene.bits for genes in configs.values() for gene in genes})
    ranks = sorted({gene.rank for genes in configs.values() for gene in genes})
    importance = importance_from_journal(priors, bits, ranks)
    if len(importance.sensitivity) == len(configs[at_top[0]]):
        predicted = [importance.total_lost(configs[c]) for c in at_top]
        result.append(_agreement(path.name, None, top, predicted, [scores[c][top] for c in at_top]))
    return result


def markdown(rows: list[Agreement]) -> str:
    lines = ["| journal | rung vs top | configs at both | Spearman ρ | lower rung's best, its place at the top |",
             "|---|---|---|---|---|"]
    lines += [f"| {row.journal} | {'priors' if row.rung is None else f'f{row.rung}'} vs f{row.top} | {row.configs} | {row.spearman:+.2f} | "
              f"{row.best_lower_at_top} of {row.configs} |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("journals", type=Path, nargs="+")
    parser.add_argument("--priors", type=Path, help="the priors journal of the compiles the journals come from")
    args = parser.parse_args()
    missing = [path for path in [*args.journals, *([args.priors] if args.priors else [])] if not path.is_file()]
    if missing:
        parser.error(f"{missing[0]} is not a file: give search journals (*.journal.jsonl) and a priors journal (WORK/priors/*.json)")
    sys.stdout.write(markdown([row for path in args.journals for row in agreements(path, args.priors)]))


if __name__ == "__main__":
    main()
