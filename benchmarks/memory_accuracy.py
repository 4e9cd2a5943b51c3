"""Memory model vs measured footprint, per component, on real training steps.

    python benchmarks/memory_accuracy.py                      # tiny random Llama/Qwen2 (seconds)
    python benchmarks/memory_accuracy.py --model smollm2-135m # the real default model (a minute or two)
    python benchmarks/memory_accuracy.py --model smollm2-135m --quantized  # two GPTQ plans (~8 min)

Each row trains one LoRA step under the harness (`qra.runtime.measure`) and prints the estimate's
persistent components beside what was counted. Transient terms and the fixed overhead are not visible
to the CPU harness and are left out here (on a GPU, compare `total_bytes` to torch.cuda.max_memory_allocated).
"""

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase  # noqa: E402

from qra.models import load_model  # noqa: E402
from qra.plans.memory import SettingsFor, estimate_memory, uniform_settings  # noqa: E402
from qra.plans.schema import Device, ModuleSettings, Training  # noqa: E402
from qra.plans.spec import LinearSpec, ModelSpec, resolve_spec, spec_from_config  # noqa: E402
from qra.runtime.data import Batch, batches, load_dataset, pad_id, training_for, training_features, worst_batch  # noqa: E402
from qra.runtime.measure import measure_lora_step  # noqa: E402
from qra.runtime.qlinear import enable_dequantize_in_backward  # noqa: E402
from qra.runtime.quantize import load_quantized, quantize_to_plan, quiet_gptqmodel  # noqa: E402
from qra.testing import tiny_config, tiny_tokenizer  # noqa: E402

with quiet_gptqmodel():  # its import banner would go to stdout, into the table
    import gptqmodel  # noqa: E402, F401


def varied_ranks(layer: int, module: LinearSpec) -> ModuleSettings:
    rank = (4, 8, 16, 32)[(layer + len(module.name)) % 4]
    return ModuleSettings(bits=16, group_size=128, rank=rank, alpha=2 * rank)


TINY_SETTINGS = [
    ("llama", "bf16 r8 b2x48", dict(batch_size=2, seq_len=48), uniform_settings(16, 8)),
    ("llama", "bf16 r8 b2x48 ckpt", dict(batch_size=2, seq_len=48, gradient_checkpointing=True), uniform_settings(16, 8)),
    ("llama", "bf16 r32 b1x200", dict(batch_size=1, seq_len=200), uniform_settings(16, 32)),
    ("llama", "bf16 r4 b6x24 ckpt", dict(batch_size=6, seq_len=24, gradient_checkpointing=True), uniform_settings(16, 4)),
    ("llama", "fp32 r16 b2x40", dict(batch_size=2, seq_len=40, compute_dtype="float32"), uniform_settings(16, 16)),
    ("llama", "fp32 r8 b3x40 ckpt", dict(batch_size=3, seq_len=40, compute_dtype="float32", gradient_checkpointing=True), uniform_settings(16, 8)),
    ("llama", "bf16 r8 dropout 0.1", dict(batch_size=2, seq_len=48, lora_dropout=0.1), uniform_settings(16, 8)),
    ("llama", "bf16 per-module ranks", dict(batch_size=2, seq_len=56), varied_ranks),
    ("qwen2", "bf16 r8 b2x48", dict(batch_size=2, seq_len=48), uniform_settings(16, 8)),
    ("qwen2", "fp32 r16 b2x72 ckpt", dict(batch_size=2, seq_len=72, compute_dtype="float32", gradient_checkpointing=True), uniform_settings(16, 16)),
]

REAL_SETTINGS = [
    ("bf16 r8 b4x128", dict(batch_size=4, seq_len=128), uniform_settings(16, 8)),
    ("bf16 r16 b2x256 ckpt", dict(batch_size=2, seq_len=256, gradient_checkpointing=True), uniform_settings(16, 16)),
]


def row(label: str, spec: ModelSpec, model: nn.Module, settings_for: SettingsFor, training: Training,
        batch: Batch | None = None) -> list[str]:
    measured = measure_lora_step(model, spec, settings_for, training, batch=batch)
    components = estimate_memory(spec, settings_for, training, Device(kind="cpu")).components
    pairs = [
        ("weights", components["quantized_weights"] + components["frozen_weights"], measured.frozen_bytes),
        ("lora", components["lora_parameters"] + components["lora_gradients"], measured.trainable_bytes + measured.gradient_bytes),
        ("optimizer", components["optimizer_state"], measured.optimizer_bytes),
        ("activations", components["saved_activations"], measured.saved_activation_bytes),
    ]
    estimated_total = sum(e for _, e, _ in pairs)
    cells = [f"{(e - m) / m * 100:+.2f}%" for _, e, m in pairs]
    total_error = (estimated_total - measured.total_bytes) / measured.total_bytes * 100
    return [label, f"{measured.total_bytes / 1e6:.2f}", f"{estimated_total / 1e6:.2f}", *cells, f"{total_error:+.2f}%"]


def tiny_rows() -> list[list[str]]:
    rows = []
    for family, label, kwargs, settings_for in TINY_SETTINGS:
        training = Training(**kwargs)
        torch.manual_seed(0)
        config = tiny_config(family)
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, training.compute_dtype))
        rows.append(row(f"tiny {family} {label}", spec_from_config(config), model, settings_for, training))
    tokenizer = tiny_tokenizer()
    for family in ("llama", "qwen2"):
        config = tiny_config(family)

        def load(config: PretrainedConfig = config) -> nn.Module:
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config).to(torch.bfloat16)

        rows += data_rows(f"tiny {family} bf16 r8", spec_from_config(config), load, uniform_settings(16, 8), tokenizer, 2, 48)
    return rows


DATA_ROWS = [
    ("joined text + prompt/response", "python-reference+arithmetic"),
    ("prompt/response only", "arithmetic"),
]


def data_shape(data: str, tokenizer: PreTrainedTokenizerBase, batch_size: int, seq_len: int) -> tuple[Training, Batch]:
    """The training settings for `data` (its batches pad or not) and its worst batch. Prompt/response-only data
    is cut at its longest sequence, so that the worst batch is full length, as the estimate assumes."""
    dataset = load_dataset(data)
    features = training_features(dataset.train, tokenizer, seq_len)
    if not any(example.is_text for example in dataset.train):
        seq_len = max(len(feature["input_ids"]) for feature in features)
    training = training_for(Training(batch_size=batch_size, seq_len=seq_len), dataset)
    return training, worst_batch(batches(features, batch_size, seed=0, epoch=0, pad=pad_id(tokenizer)))


def data_rows(label: str, spec: ModelSpec, load: Callable[[], nn.Module], settings_for: SettingsFor,
              tokenizer: PreTrainedTokenizerBase, batch_size: int, seq_len: int) -> list[list[str]]:
    """One row per kind of data: a training step on the data's worst real batch."""
    rows = []
    for kind, data in DATA_ROWS:
        training, batch = data_shape(data, tokenizer, batch_size, seq_len)
        shape = f"b{batch_size}x{training.seq_len}"
        rows.append(row(f"{label} {shape} {kind} ({data})", spec, load(), settings_for, training, batch))
    return rows


def real_rows(model_name: str) -> list[list[str]]:
    source, spec, _ = resolve_spec(model_name)
    rows = []
    for label, kwargs, settings_for in REAL_SETTINGS:
        model, _ = load_model(source, "bfloat16")
        rows.append(row(f"{model_name} {label}", spec, model, settings_for, Training(**kwargs)))
    return rows


def mixed_plan(layer: int, module: LinearSpec) -> ModuleSettings:
    bits, rank = ((3, 16), (4, 8), (8, 4))[layer % 3]
    return ModuleSettings(bits=bits, group_size=128, rank=rank, alpha=2 * rank)


QUANTIZED_PLANS = [
    ("4-bit r8 b4x128", dict(batch_size=4, seq_len=128), uniform_settings(4, 8)),
    ("mixed 3/4/8-bit r16/8/4 b2x256", dict(batch_size=2, seq_len=256), mixed_plan),
]


def quantized_rows(model_name: str) -> list[list[str]]:
    """Each plan GPTQ-quantized for real, trained through the memory-faithful path."""
    source, spec, _ = resolve_spec(model_name)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, spec.vocab_size, (256,), generator=generator).tolist() for _ in range(16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        model, tokenizer = load_model(source, "bfloat16")
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        for index, (label, kwargs, settings_for) in enumerate(QUANTIZED_PLANS):
            checkpoint = quantize_to_plan(base, spec, settings_for, calibration, Path(tmp) / f"gptq{index}")

            def load(checkpoint: Path = checkpoint) -> nn.Module:
                model = load_quantized(checkpoint).model
                enable_dequantize_in_backward(model)
                return model

            rows.append(row(f"{model_name} GPTQ {label}", spec, load(), settings_for, Training(**kwargs)))
            if index == 0:
                rows += data_rows(f"{model_name} GPTQ 4-bit r8", spec, load, settings_for, tokenizer, 4, 128)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="measure this real model (e.g. smollm2-135m) instead of tiny ones")
    parser.add_argument("--quantized", action="store_true", help="with --model: GPTQ-quantize it at two plans first")
    args = parser.parse_args()
    if args.model:
        rows = quantized_rows(args.model) if args.quantized else real_rows(args.model)
    else:
        rows = tiny_rows()
    header = ["setting", "measured MB", "estimated MB", "weights", "lora+grads", "optimizer", "activations", "total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
