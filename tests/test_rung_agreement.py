"""experiments/rung_agreement.py: a lower rung's ranking against the top rung's, read from a search journal."""

import json
from pathlib import Path

from rung_agreement import agreements, markdown


def _journal(path: Path, rows: list[tuple[str, int, float]]) -> Path:
    lines = [json.dumps({"journal": "qra-search", "key": "any"})]
    lines += [json.dumps({"index": i, "config": c, "fidelity": f, "score": s, "seconds": 1.0, "stage": "x"})
              for i, (c, f, s) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_rung_that_reverses_the_tops_order_has_spearman_minus_one_and_its_best_lands_last(tmp_path):
    rows = [("a", 0, 3.0), ("b", 0, 3.1), ("c", 0, 3.2), ("d", 0, 3.3),
            ("a", 1, 2.0), ("b", 1, 2.1), ("c", 1, 2.2),
            ("a", 2, 1.9), ("b", 2, 1.8), ("c", 2, 1.7)]
    found = {row.rung: row for row in agreements(_journal(tmp_path / "j.jsonl", rows))}
    assert set(found) == {0, 1}
    assert found[1].configs == 3 and found[1].spearman == -1.0 and found[1].best_lower_at_top == 3
    assert "f1 vs f2" in markdown(list(found.values()))


def test_a_failed_run_is_left_out_not_ranked_last(tmp_path):
    rows = [("a", 0, 3.0), ("b", 0, 3.1), ("c", 0, 3.2), ("d", 0, 2.0),
            ("a", 1, 2.0), ("b", 1, 2.1), ("c", 1, 2.2), ("d", 1, None)]
    (found,) = agreements(_journal(tmp_path / "j.jsonl", rows))
    assert found.configs == 3 and found.spearman == 1.0 and found.best_lower_at_top == 1


def test_a_journal_with_too_few_configs_at_both_rungs_gives_nothing(tmp_path):
    rows = [("a", 0, 3.0), ("b", 0, 3.1), ("a", 1, 2.0), ("b", 1, 2.1), ("c", 1, 2.2)]
    assert agreements(_journal(tmp_path / "j.jsonl", rows)) == []


def _priors(path: Path, units: int) -> Path:
    """A priors journal: unit u loses 0.1·(u + 1) at 4 bits and nothing at 8; no rank gains anything."""
    entries = {"base": 1.0}
    for unit in range(units):
        entries |= {f"sensitivity-kl/{unit}/4": 0.1 * (unit + 1), f"sensitivity-kl/{unit}/8": 0.0,
                    f"plasticity-taylor/{unit}/4": 0.0}
    path.write_text(json.dumps({"key": "any", "entries": entries}))
    return path


def test_the_priors_prediction_is_compared_with_the_top_where_its_units_match(tmp_path):
    # the priors predict: 8 bits on the second unit loses least (0.1), then on the first (0.2), then none (0.3)
    rows = [("8:4,4:4", 1, 2.0), ("4:4,8:4", 1, 2.1), ("4:4,4:4", 1, 2.2)]
    journal = _journal(tmp_path / "j.jsonl", rows)
    (found,) = [row for row in agreements(journal, _priors(tmp_path / "p.json", 2)) if row.rung is None]
    assert found.configs == 3 and found.spearman == 0.5 and found.best_lower_at_top == 2
    assert "| priors vs f1 |" in markdown([found])
    assert all(row.rung is not None for row in agreements(journal, _priors(tmp_path / "p3.json", 3)))  # other units
