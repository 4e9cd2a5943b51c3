"""How well a lower rung of the fidelity ladder ranks candidates the way the top rung does, from search journals.

    python tools/rung_agreement.py OUT/plans/*.journal.jsonl     # search journals, e.g. tools/bench_quality.py's

The top is the highest rung the journal holds (a quick compile's journal often reaches the screen rung only:
then that rung is compared with the ones below it). For each journal and each rung below that top: the configurations scored at both that rung and the top,
the Spearman rank correlation of their two scores, and where the lower rung's best lands at the top (1 =
also best there). Only configurations that were promoted have a top-rung score, so the correlation is over
the survivors of the lower rung: it says how well that rung orders candidates good enough to reach the top,
which is what promotion and the refinement's screen ask of it. Reads the records as written (the journal's
key is not checked: any compile's journal will do).
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import spearmanr


@dataclass(frozen=True)
class Agreement:
    journal: str
    rung: int
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


def agreements(path: Path) -> list[Agreement]:
    scores = scores_by_config(path)
    rungs = sorted({rung for by_rung in scores.values() for rung in by_rung})
    if len(rungs) < 2:
        return []
    top, result = rungs[-1], []
    for rung in rungs[:-1]:
        both = [config for config, by_rung in scores.items() if rung in by_rung and top in by_rung]
        if len(both) < 3:
            continue
        lower = [scores[config][rung] for config in both]
        upper = [scores[config][top] for config in both]
        best_lower = both[lower.index(min(lower))]
        place = sorted(upper).index(scores[best_lower][top]) + 1
        result.append(Agreement(path.name, rung, top, len(both), float(spearmanr(lower, upper)[0]), place))
    return result


def markdown(rows: list[Agreement]) -> str:
    lines = ["| journal | rung vs top | configs at both | Spearman ρ | lower rung's best, its place at the top |",
             "|---|---|---|---|---|"]
    lines += [f"| {row.journal} | f{row.rung} vs f{row.top} | {row.configs} | {row.spearman:+.2f} | "
              f"{row.best_lower_at_top} of {row.configs} |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("journals", type=Path, nargs="+")
    args = parser.parse_args()
    sys.stdout.write(markdown([row for path in args.journals for row in agreements(path)]))


if __name__ == "__main__":
    main()
