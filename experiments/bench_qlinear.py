"""The memory-faithful quantized training path against gptqmodel's plain TORCH path + peft.

    python experiments/bench_qlinear.py                        # a random 8-layer Llama (hidden 512), ~2 min
    python experiments/bench_qlinear.py --model smollm2-135m   # the real default model (quantizing it: ~3 min)

Both paths train the same quantized checkpoint with the same LoRA plan and batches. Printed per path:
median step time, saved activations, dequantized weights kept for backward, and the measured footprint,
with ratios against the plain path measured in the same run.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from qra.models import load_model, resolve_model  # noqa: E402
from qra.plans.memory import uniform_settings  # noqa: E402
from qra.plans.schema import Training  # noqa: E402
from qra.plans.spec import ModelSpec, resolve_spec  # noqa: E402
from qra.runtime.lora import attach_lora  # noqa: E402
from qra.runtime.measure import measure_training_step  # noqa: E402
from qra.runtime.qlinear import enable_dequantize_in_backward  # noqa: E402
from qra.runtime.quantize import load_quantized, quantize_to_plan  # noqa: E402
from qra.testing import tiny_tokenizer  # noqa: E402

BITS = 4


def synthetic_folder(folder: Path) -> Path:
    """A random 8-layer Llama (hidden 512) with `qra.testing`'s tokenizer, saved to `folder`."""
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=320, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def real_folder(name: str, folder: Path) -> Path:
    """The model `name` in bf16 with its tokenizer, saved to `folder`."""
    model, tokenizer = load_model(resolve_model(name), "bfloat16")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bench(checkpoint: Path, spec: ModelSpec, training: Training, faithful: bool, steps: int) -> dict:
    """Median step time and the measured footprint of LoRA r8 training on `checkpoint`, faithful path or plain."""
    model = load_quantized(checkpoint).model
    model.config.use_cache = False
    if faithful:
        enable_dequantize_in_backward(model)
    settings = uniform_settings(BITS, 8)
    peft_model = attach_lora(model, spec, settings)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (training.batch_size, training.seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    footprint = measure_training_step(peft_model, optimizer, batch)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return {"step_s": statistics.median(times), "footprint": footprint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a real model (e.g. smollm2-135m) instead of the synthetic one")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=96)
    args = parser.parse_args()
    training = Training(batch_size=args.batch_size, seq_len=args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base = real_folder(args.model, base) if args.model else synthetic_folder(base)
        spec = resolve_spec(str(base), args.seq_len).spec
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randint(0, spec.vocab_size, (128,), generator=generator).tolist() for _ in range(16)]
        checkpoint = quantize_to_plan(base, spec, uniform_settings(BITS, 8), calibration, Path(tmp) / "gptq")
        plain = bench(checkpoint, spec, training, faithful=False, steps=args.steps)
        faithful = bench(checkpoint, spec, training, faithful=True, steps=args.steps)
    rows = [("gptqmodel TORCH + peft (plain)", plain), ("qra dequantize-in-backward", faithful)]
    header = "| path | step s | saved activations MB | dequantized weights kept MB | footprint MB | time ratio | footprint ratio |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, result in rows:
        fp = result["footprint"]
        lines.append(
            f"| {name} | {result['step_s']:.3f} | {fp.saved_activation_bytes / 1e6:.1f} | {fp.saved_weight_like_bytes / 1e6:.1f} "
            f"| {fp.total_bytes / 1e6:.1f} | {result['step_s'] / plain['step_s']:.2f}x | {fp.total_bytes / plain['footprint'].total_bytes:.2f}x |"
        )
    label = args.model or "synthetic Llama 8x512"
    sys.stdout.write(f"{label}, 4-bit g128, LoRA r8, batch {args.batch_size}x{args.seq_len}, {args.steps} timed steps\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
