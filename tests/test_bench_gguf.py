"""tools/bench_gguf.py on a tiny model: one materialized fine-tune, the plan's GGUF beside llama.cpp's recipes
and the nearest uniform type, the merged and gptq artifacts, all scored on the same held-out tokens."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from bench_gguf import main  # noqa: E402

from qra.plans.io import save_plan  # noqa: E402
from test_materialize import mixed_plan  # noqa: E402
from tiny import save_tiny_model, tiny_corpus  # noqa: E402


def test_bench_gguf_scores_every_artifact_on_the_same_tokens_and_pairs_them_with_the_plan(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", layers=4)
    plan_path = tmp_path / "plan.yaml"
    save_plan(mixed_plan(folder, steps=4), plan_path)
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", examples=40)
    main(["--plan", str(plan_path), "--data", str(corpus), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "report")])

    report = json.loads((tmp_path / "report" / "gguf.json").read_text())["artifacts"]
    names = list(report)
    assert names[:3] == ["qra plan", "Q4_K_M", "Q4_K_S"] and names[3].startswith("uniform ")
    assert names[4:] == ["merged (bf16 weights, fp32 compute)", "gptq"]
    plan = report["qra plan"]
    assert plan["paired_vs_plan"] is None and plan["file_bytes"] > 0
    tokens = {task: score["tokens"] for task, score in plan["by_task"].items()}
    for name in names[1:]:
        artifact = report[name]
        assert {task: score["tokens"] for task, score in artifact["by_task"].items()} == tokens, name
        # paired over the same tokens: the difference of the losses, with its own standard error
        assert artifact["paired_vs_plan"]["mean"] == pytest.approx(artifact["mean"] - plan["mean"], abs=1e-9)
        assert artifact["paired_vs_plan"]["se"] > 0
    assert "| qra plan | llama.cpp |" in capsys.readouterr().out
