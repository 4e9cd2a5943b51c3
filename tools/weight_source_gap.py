"""The weight-source gap before any fine-tuning: the same plan's weights from the search's quantization cache
(per-module GPTQ on the float model's inputs) and from `qra materialize`'s gptqmodel pass (sequential), each
swapped into the float model and scored on every held-out sequence; materialize's own packed model scored the
same way; and each source's squared error against the float weights.

    python tools/weight_source_gap.py --bench runs/bench-quality \\
        --quantized runs/bench-quality/cache/quantized/<key> --out runs/bench-quality/weight-source-gap.json

`--quantized` is a folder materialize's gptqmodel pass wrote (`bench_quality.py --weight-source-gap` leaves
the B1 uniform plan's under `<bench>/cache/quantized/`); every module's bits are read from its
`quantize_config.json`. The evaluator is the benchmark's (its data, schedule and quantization cache under
`<bench>/work`), so the cached weights are the ones the search scored. About 2 minutes on 2 cores.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from bench_quality import Settings, compile_request

from qra.compiler.compile import build_evaluator
from qra.files import write_text
from qra.plans.schema import Budget
from qra.runtime.heldout import score_held_out
from qra.runtime.quantize import load_quantized


def planned_bits(folder: Path) -> dict[str, int]:
    """Each quantized module's bits, from the `dynamic` entries of the checkpoint's quantize_config.json."""
    dynamic = json.loads((folder / "quantize_config.json").read_text())["dynamic"]
    bits = {}
    for pattern, settings in dynamic.items():
        if pattern.startswith("+:"):
            path = re.sub(r"\\(.)", r"\1", pattern[2:].strip("^$"))
            bits[path] = settings["bits"]
    return bits


def measure(bench: Path, quantized: Path, settings: Settings) -> dict:
    request = compile_request(settings, Budget(bytes=10**12, text="any"), "layer", bench)
    evaluator = build_evaluator(request)
    spec, model, held_out = evaluator.space.spec, evaluator.model, evaluator.data.held_out
    bits = planned_bits(quantized)
    modules = [(index, module, spec.module_path(index, module)) for index, layer in enumerate(spec.layers) for module in layer
               if spec.module_path(index, module) in bits]
    scores = {"float": score_held_out(model, held_out)}
    wrapper = load_quantized(quantized)
    sources = {"cached": {}, "gptqmodel": {}}
    for index, module, path in modules:
        sources["cached"][path] = evaluator.cache.weight(index, module, bits[path])
        sources["gptqmodel"][path] = wrapper.model.get_submodule(path).dequantize_weight().T.contiguous()
    errors = {}
    for name, weights in sources.items():
        originals = {path: model.get_submodule(path).weight.data for _, _, path in modules}
        errors[name] = sum((weights[path].float() - originals[path].float()).pow(2).sum().item() for path in originals)
        try:
            for path, weight in weights.items():
                model.get_submodule(path).weight.data = weight.to(originals[path].dtype)
            scores[name] = score_held_out(model, held_out)
        finally:
            for path, original in originals.items():
                model.get_submodule(path).weight.data = original
    packed = wrapper.model.eval()  # materialize's own model: the packed modules, its fp32 rotary frequencies
    scores["gptqmodel, packed"] = score_held_out(packed, held_out)
    return {
        "quantized": str(quantized), "modules": len(modules),
        "held_out_loss": {name: {"mean": s.mean, "se": s.se, "by_task": {t: v.loss for t, v in s.by_task.items()}}
                          for name, s in scores.items()},
        "squared_weight_error": errors,
    }


def markdown(result: dict) -> str:
    tasks = list(result["held_out_loss"]["float"]["by_task"])
    lines = [f"Weights before fine-tuning ({result['modules']} quantized modules), held-out loss on every sequence:", "",
             "| weights | loss (mean of tasks) | " + " | ".join(tasks) + " | squared error vs float |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for name, loss in result["held_out_loss"].items():
        error = result["squared_weight_error"].get(name)
        cells = " | ".join(f"{loss['by_task'][task]:.4f}" for task in tasks)
        lines.append(f"| {name} | {loss['mean']:.4f} ± {loss['se']:.4f} | {cells} | {'' if error is None else f'{error:,.0f}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--quantized", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality/weight-source-gap.json"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="python-reference+arithmetic")
    args = parser.parse_args()
    settings = Settings(model=args.model, data=args.data, seq_len=128, batch_size=4, steps=40, effort="quick", seeds=(10,))
    result = measure(args.bench, args.quantized, settings)
    write_text(args.out, json.dumps(result, indent=2))
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
