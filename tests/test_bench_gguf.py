"""benchmarks/bench_gguf.py on a tiny model: one materialized fine-tune, the exact GGUF with its adapter beside
llama.cpp's recipes of the merged model, each scored on the same held-out tokens and paired with the trained
model; and each GGUF timed in llama.cpp."""

import json

import pytest
from bench_gguf import EXACT, TRAINED, main
from test_materialize import mixed_plan

from qra.plans.io import save_plan
from qra.testing import save_tiny_model, tiny_corpus


def test_bench_gguf_pairs_every_served_artifact_with_the_trained_model_on_the_same_tokens(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model", layers=4)
    plan_path = tmp_path / "plan.yaml"
    save_plan(mixed_plan(folder, steps=4), plan_path)
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", examples=40)
    main(["--plans", str(plan_path), "--seeds", "0", "--data", str(corpus), "--out", str(tmp_path / "out"),
          "--report", str(tmp_path / "report"), "--speed"])

    plan = json.loads((tmp_path / "report" / "serving.json").read_text())["plans"]["plan.yaml"]
    assert plan["artifacts"] == [TRAINED, EXACT, "Q4_K_M of merged", "Q8_0 of merged"]
    run = plan["runs"]["0"]
    assert run[TRAINED]["vs_trained"] == {"difference": 0.0, "se": 0.0}
    for name in plan["artifacts"][1:]:
        artifact = run[name]
        # paired over the same tokens: the difference of the losses, with its own standard error
        assert artifact["vs_trained"]["difference"] == pytest.approx(artifact["loss"] - run[TRAINED]["loss"], abs=1e-9)
        assert artifact["vs_trained"]["se"] > 0 and artifact["file_bytes"] > 0
        assert plan["speed"][name]["generation_tokens_per_s"] > 0
    assert run[EXACT]["adapter_bytes"] > 0
    assert f"| {EXACT} | llama.cpp |" in capsys.readouterr().out
