"""What a llama.cpp user is served: the exact GGUF (the trained GPTQ base transcoded, plus the GGUF LoRA
adapter) against llama.cpp's own Q4_K_M and Q8_0 of the merged model, and the trained model in qra.

For each plan and training seed, the plan is materialized once (`--format adapter,merged,gguf`, the exact
GGUF by default). Every artifact is scored on every held-out sequence materialize scores, in the runtime that
serves it, and paired per sequence with the trained model (the `adapter` package: its GPTQ base with the
adapter, in qra), so each difference comes with its own standard error. `--speed` then times each GGUF in
llama.cpp on 2 threads (prompt and generation tokens/s); run it with nothing else on the machine.

    python benchmarks/bench_gguf.py --out runs/bench-gguf --report docs/results/serving
    python benchmarks/bench_gguf.py --out runs/bench-gguf --report docs/results/serving --speed

Resumable: each materialized run, each GGUF and each artifact's scores are kept under `--out`.
"""

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from qra.benchmark import DATA
from qra.files import write_text
from qra.models import resolve_model
from qra.plans.io import load_plan
from qra.plans.schema import Plan
from qra.runtime.data import load_dataset
from qra.runtime.heldout import HeldOut, held_out_sums
from qra.runtime.materialize import MaterializeRequest, held_out_by_task, materialize
from qra.runtime.package.adapter import load_adapter_package
from qra.runtime.package.gguf import ADAPTER_FILE, MODEL_FILE, bf16_gguf, bits_per_weight
from qra.runtime.package.gguf_mix import quantize
from qra.runtime.package.serving import Sums, llama_cpp_logits_of, paired_difference, scores, sequence_sums

log = logging.getLogger("bench_gguf")

PLANS = [Path("plans/smollm2-135m-1546.2MB-module.yaml"), Path("plans/smollm2-135m-1517.9MB-module.yaml")]
RECIPES = {"Q4_K_M": "MOSTLY_Q4_K_M", "Q8_0": "MOSTLY_Q8_0"}
EXACT = "qra exact + adapter"
TRAINED = "trained model (qra)"
SPEED_PROMPT = "Objects are Python's abstraction for data. All data in a Python program is represented by objects"
GENERATED_TOKENS = 64


@dataclass(frozen=True)
class Artifact:
    name: str
    runtime: str
    model: Path
    adapter: Path | None = None


def materialized(plan: Plan, seed: int, data: str, folder: Path, cache: Path) -> Path:
    """The plan fine-tuned at training seed `seed` and packaged as adapter, merged and exact gguf (once)."""
    if not (folder / "results.json").exists():
        seeded = plan.model_copy(update={"training": plan.training.model_copy(update={"seed": seed})})
        request = MaterializeRequest(plan=seeded, output=folder, data=data, formats=["adapter", "merged", "gguf"],
                                     resume=folder.exists(), cache=cache, data_seed=0, exact_match_examples=0)
        materialize(request)
    return folder


def _kept(path: Path, make) -> Path:
    """`path`, made once (through a temporary name, so an interrupted run leaves no half file)."""
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        make(partial)
        partial.replace(path)
    return path


def artifacts(folder: Path, model: str) -> list[Artifact]:
    """The exact pair, and llama.cpp's recipes of the merged model (quantized from its BF16 GGUF)."""
    source = resolve_model(model)
    merged = folder / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    bf16 = _kept(folder / "merged-bf16.gguf", lambda path: bf16_gguf(merged, tokenizer, path, "bench",
                                                                    source.path if source.kind == "gguf" else None))
    found = [Artifact(EXACT, "llama.cpp", folder / "gguf" / MODEL_FILE, folder / "gguf" / ADAPTER_FILE)]
    for name, file_type in RECIPES.items():
        path = _kept(folder / f"merged-{name}.gguf", lambda path, file_type=file_type: quantize(bf16, path, file_type))
        found.append(Artifact(f"{name} of merged", "llama.cpp", path))
    return found


def _save_sums(path: Path, sums: Sums) -> None:
    torch.save({task: (s.clone(), n.clone()) for task, (s, n) in sums.items()}, path)


def cached_sums(path: Path, compute: Callable[[], Sums]) -> Sums:
    """The sums saved at `path`, else `compute()`'s, saved there."""
    if path.exists():
        return torch.load(path)
    sums = compute()
    with_partial = path.with_name(path.name + ".partial")
    _save_sums(with_partial, sums)
    with_partial.replace(path)
    return sums


def llama_cpp_sums(artifact: Artifact, held_out: HeldOut, context: int) -> Sums:
    logits_of, close = llama_cpp_logits_of(artifact.model, artifact.adapter, context=context)
    try:
        return sequence_sums(logits_of, held_out)
    finally:
        close()


def score_run(folder: Path, plan: Plan, data: str) -> dict:
    """Every artifact of one materialized run, scored and paired with the trained model on the same tokens."""
    tokenizer = AutoTokenizer.from_pretrained(folder / "merged")
    held_out = held_out_by_task(load_dataset(data, seed=0), tokenizer, plan.training, 0)
    trained = cached_sums(folder / "sums-trained.pt", lambda: held_out_sums(load_adapter_package(folder / "adapter"), held_out))
    records = {TRAINED: _record(TRAINED, "qra (gptqmodel + peft)", None, trained, trained)}
    for artifact in artifacts(folder, plan.model.id):
        slug = artifact.name.split()[0]
        sums = cached_sums(folder / f"sums-{slug}.pt", lambda artifact=artifact: llama_cpp_sums(artifact, held_out, plan.training.seq_len))
        records[artifact.name] = _record(artifact.name, artifact.runtime, artifact, sums, trained)
    return records


def _record(name: str, runtime: str, artifact: Artifact | None, sums: Sums, trained: Sums) -> dict:
    own, difference = scores(sums), paired_difference(sums, trained)
    record = {"runtime": runtime, "loss": own.mean, "se": own.se, "by_task": own.losses(),
              "vs_trained": {"difference": difference.mean, "se": difference.se}}
    if artifact is not None:
        record["file_bytes"] = artifact.model.stat().st_size
        record["adapter_bytes"] = artifact.adapter.stat().st_size if artifact.adapter else 0
        record["bits_per_weight"] = bits_per_weight(artifact.model)
    return record


def speed(artifact: Artifact, threads: int = 2) -> dict:
    """llama.cpp's prompt and generation speed for one artifact on `threads` CPU threads (greedy decoding)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(artifact.model), lora_path=None if artifact.adapter is None else str(artifact.adapter),
                n_ctx=256, n_threads=threads, n_gpu_layers=0, verbose=False)
    prompt = llm.tokenize(SPEED_PROMPT.encode())
    began = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - began
    began = time.perf_counter()
    generated = []
    for _ in range(GENERATED_TOKENS):
        token = llm.sample(temp=0.0)
        generated.append(token)
        llm.eval([token])
    generate_s = time.perf_counter() - began
    sample = llm.detokenize(generated).decode(errors="replace")
    llm.close()
    return {"threads": threads, "prompt_tokens_per_s": len(prompt) / prompt_s,
            "generation_tokens_per_s": len(generated) / generate_s, "sample": sample}


def markdown(report: dict) -> str:
    lines = [
        f"Data {report['data']}, {len(report['seeds'])} training seeds {report['seeds']}; every held-out sequence, each "
        "artifact in its own runtime. Loss: mean over tasks, averaged over seeds. vs trained: the artifact's loss "
        "minus the trained model's on the same tokens, per seed ± the paired SE (positive: worse).",
        "",
    ]
    for plan_name, plan in report["plans"].items():
        lines += [f"**{plan_name}**", "", "| artifact | runtime | file MB | bits/weight | loss | vs trained, per seed | "
                  "prompt tok/s | generation tok/s |", "|---|---|---|---|---|---|---|---|"]
        for name in plan["artifacts"]:
            rows = [run[name] for run in plan["runs"].values()]
            loss = sum(row["loss"] for row in rows) / len(rows)
            first = rows[0]
            size = "" if "file_bytes" not in first else f"{(first['file_bytes'] + first['adapter_bytes']) / 1e6:.1f}"
            bpw = "" if "bits_per_weight" not in first else f"{first['bits_per_weight']:.2f}"
            differences = ", ".join(f"{row['vs_trained']['difference']:+.4f} ± {row['vs_trained']['se']:.4f}" for row in rows)
            timing = plan.get("speed", {}).get(name)
            prompt = "" if timing is None else f"{timing['prompt_tokens_per_s']:.0f}"
            generation = "" if timing is None else f"{timing['generation_tokens_per_s']:.0f}"
            lines.append(f"| {name} | {first['runtime']} | {size} | {bpw} | {loss:.4f} | {differences} | {prompt} | {generation} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=Path, nargs="+", default=PLANS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gguf"))
    parser.add_argument("--report", type=Path, help="folder for serving.json and serving.md")
    parser.add_argument("--speed", action="store_true", help="also time each GGUF of the first seed in llama.cpp (2 threads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"data": args.data, "seeds": args.seeds, "plans": {}}
    for plan_path in args.plans:
        plan = load_plan(plan_path)
        runs = {}
        for seed in args.seeds:
            log.info("%s, seed %d", plan_path.name, seed)
            folder = materialized(plan, seed, args.data, args.out / plan_path.stem / f"seed-{seed}", args.out / "cache")
            runs[str(seed)] = score_run(folder, plan, args.data)
        entry = {"artifacts": list(runs[str(args.seeds[0])]), "runs": runs}
        if args.speed:
            folder = args.out / plan_path.stem / f"seed-{args.seeds[0]}"
            entry["speed"] = {artifact.name: speed(artifact) for artifact in artifacts(folder, plan.model.id)}
        report["plans"][plan_path.name] = entry
        if args.report:  # written as each plan finishes
            args.report.mkdir(parents=True, exist_ok=True)
            write_text(args.report / "serving.json", json.dumps(report, indent=2) + "\n")
            write_text(args.report / "serving.md", markdown(report))
    sys.stdout.write(markdown(report))


if __name__ == "__main__":
    main()
