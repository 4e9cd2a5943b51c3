"""The `gguf` format against llama.cpp's own recipes, on one fine-tuned model: does the plan's per-tensor mix
beat Q4_K_M, Q4_K_S and a uniform type of the same file size?

The plan is materialized once (`qra materialize --format merged,gptq,gguf`); from its merged model the same
BF16 GGUF the format starts from is quantized by llama.cpp with each recipe. Every GGUF is run in llama.cpp
(llama-cpp-python), the merged and gptq artifacts in torch, all on every held-out sequence materialize
scores, token for token the same positions. Paired differences are taken against the plan's GGUF per
sequence (the same tokens), so their standard errors are those of the difference.

    python tools/bench_gguf.py --plan plans/smollm2-135m-1546.2MB.yaml --out runs/bench-gguf --report docs/results/gguf

Resumable: the materialized model and every GGUF are kept under `--out`. 27 minutes on 2 cores beside another
benchmark, most of it the fine-tune and scoring every held-out sequence in six artifacts.
"""

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qra.files import write_text
from qra.models import resolve_model
from qra.plans.io import load_plan
from qra.runtime.data import Batch, load_dataset
from qra.runtime.heldout import HeldOut, Scores, held_out_sums, logit_losses, task_score
from qra.runtime.materialize import MaterializeRequest, held_out_by_task, materialize
from qra.runtime.package.gguf import MODEL_FILE, bf16_gguf, bits_per_weight, quantize
from qra.runtime.quantize import load_quantized

log = logging.getLogger("bench_gguf")

RECIPES = {"Q4_K_M": "MOSTLY_Q4_K_M", "Q4_K_S": "MOSTLY_Q4_K_S"}
# uniform types (llama.cpp's `pure`: every tensor, embeddings included) tried for the one nearest the plan's size
UNIFORM = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0"}

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (summed loss per sequence, scored tokens per sequence)


@dataclass
class Variant:
    name: str
    runtime: str
    path: Path
    sums: Sums


def _unpadded(batch: Batch, row: int) -> tuple[list[int], torch.Tensor]:
    """One sequence of a right-padded batch: its tokens and labels without the padding."""
    mask = batch["attention_mask"][row]
    length = int(mask.sum())
    if not bool(mask[:length].all()):
        raise SystemExit("held-out batches are not right-padded; llama.cpp needs each sequence from position 0")
    return batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length]


def llama_cpp_sums(path: Path, held_out: HeldOut, context: int) -> Sums:
    """Per sequence, the summed next-token loss and token count that `held_out_sums` gives, from llama.cpp's logits."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, logits_all=True, n_gpu_layers=0, verbose=False)
    sums = {}
    for task, batches in held_out.items():
        parts = []
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                ids, labels = _unpadded(batch, row)
                llm.reset()
                llm.eval(ids)
                logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
                parts.append(logit_losses(logits[None], labels[None]))
        sums[task] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    llm.close()
    return sums


def _kept(path: Path, make: Callable[[Path], None]) -> Path:
    """`path`, made once (through a temporary name, so an interrupted run leaves no half file)."""
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        make(partial)
        partial.replace(path)
    return path


def materialized(plan_path: Path, data: str, out: Path) -> Path:
    folder = out / "materialized"
    if not (folder / "results.json").exists():
        request = MaterializeRequest(plan=load_plan(plan_path), output=folder, data=data, formats=["merged", "gptq", "gguf"],
                                     resume=folder.exists(), cache=out / "cache", data_seed=0)
        materialize(request)
    return folder


def gguf_variants(folder: Path, out: Path, model: str) -> dict[str, Path]:
    """The plan's GGUF, llama.cpp's recipes, and the uniform type whose file is nearest the plan's in size."""
    source = resolve_model(model)
    merged = folder / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    bf16 = _kept(out / "model-bf16.gguf", lambda path: bf16_gguf(merged, tokenizer, path, "bench",
                                                                  source.path if source.kind == "gguf" else None))
    paths = {"qra plan": folder / "gguf" / MODEL_FILE}
    for name, file_type in RECIPES.items():
        paths[name] = _kept(out / f"{name}.gguf", lambda path, file_type=file_type: quantize(bf16, path, file_type))
    uniform = {name: _kept(out / f"pure-{name}.gguf", lambda path, file_type=file_type: quantize(bf16, path, file_type, pure=True))
               for name, file_type in UNIFORM.items()}
    size = paths["qra plan"].stat().st_size
    nearest = min(uniform, key=lambda name: abs(uniform[name].stat().st_size - size))
    paths[f"uniform {nearest}"] = uniform[nearest]
    return paths


def _scores(sums: Sums) -> Scores:
    return Scores({task: task_score(*parts) for task, parts in sums.items()})


def _paired(sums: Sums, reference: Sums) -> Scores:
    """Per task, this variant's loss minus the reference's on the same tokens, with the SE of the difference."""
    return _scores({task: (sums[task][0] - reference[task][0], sums[task][1]) for task in sums})


def report(variants: list[Variant], reference: Variant, settings: dict) -> tuple[dict, str]:
    rows, records = [], {}
    tasks = list(reference.sums)
    header = ["artifact", "runs in", "file MB", "bits/weight", *tasks, "mean", "vs qra plan (paired)"]
    for variant in variants:
        scores = _scores(variant.sums)
        by_task, mean, se = scores.by_task, scores.mean, scores.se
        difference = _paired(variant.sums, reference.sums) if variant is not reference else None
        paired = None if difference is None else (difference.mean, difference.se)
        gguf_file = variant.path.suffix == ".gguf"
        records[variant.name] = {
            "runtime": variant.runtime, "path": str(variant.path),
            "file_bytes": variant.path.stat().st_size if gguf_file else None,
            "bits_per_weight": bits_per_weight(variant.path) if gguf_file else None,
            "by_task": {task: vars(score) for task, score in by_task.items()}, "mean": mean, "se": se,
            "paired_vs_plan": None if paired is None else {"mean": paired[0], "se": paired[1]},
        }
        record = records[variant.name]
        rows.append([
            variant.name, variant.runtime,
            f"{record['file_bytes'] / 1e6:.1f}" if gguf_file else "",
            f"{record['bits_per_weight']:.3f}" if gguf_file else "",
            *(f"{by_task[task].loss:.4f} ± {by_task[task].se:.4f}" for task in tasks),
            f"{mean:.4f} ± {se:.4f}",
            "" if paired is None else f"{paired[0]:+.4f} ± {paired[1]:.4f}" + (" (beyond 2 SE)" if abs(paired[0]) > 2 * paired[1] else ""),
        ])
    lines = [
        f"Plan {settings['plan']}, data {settings['data']}: held-out loss of each artifact of one fine-tune, every held-out "
        "sequence, each task's loss ± its standard error over sequences; paired: minus the qra plan's GGUF on the same "
        "tokens, ± the SE of that difference (positive: worse than the plan's mix).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return {"settings": settings, "artifacts": records}, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, default=Path("plans/smollm2-135m-1546.2MB.yaml"))
    parser.add_argument("--data", default="python-reference+arithmetic")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gguf"))
    parser.add_argument("--report", type=Path, help="folder for gguf.json and gguf.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)

    plan = load_plan(args.plan)
    folder = materialized(args.plan, args.data, args.out)
    tokenizer = AutoTokenizer.from_pretrained(folder / "merged")
    held_out = held_out_by_task(load_dataset(args.data, seed=0), tokenizer, plan.training, 0)
    context = plan.training.seq_len
    variants = [Variant(name, "llama.cpp", path, llama_cpp_sums(path, held_out, context))
                for name, path in gguf_variants(folder, args.out, plan.model.id).items()]
    log.info("scoring the merged and gptq artifacts in torch")
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=torch.float32)
    variants.append(Variant("merged (bf16 weights, fp32 compute)", "torch", folder / "merged", held_out_sums(merged, held_out)))
    del merged
    gptq = load_quantized(folder / "gptq").model
    variants.append(Variant("gptq", "gptqmodel", folder / "gptq", held_out_sums(gptq, held_out)))
    settings = {"plan": str(args.plan), "data": args.data, "steps": plan.training.steps,
                "learning_rate": plan.training.learning_rate, "seed": plan.training.seed}
    record, table = report(variants, variants[0], settings)
    sys.stdout.write(table)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        write_text(args.report / "gguf.json", json.dumps(record, indent=2) + "\n")
        write_text(args.report / "gguf.md", table)


if __name__ == "__main__":
    main()
