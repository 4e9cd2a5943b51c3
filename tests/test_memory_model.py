"""The memory model agrees with what a real training step holds, measured by the harness."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qra.plans.memory import estimate_memory, uniform_settings
from qra.plans.schema import ModuleSettings, Device, Training
from qra.plans.spec import spec_from_config
from qra.runtime.measure import measure_lora_step
from qra.testing import tiny_config


def varied_ranks(layer, module):
    rank = (4, 8, 16, 32)[(layer + len(module.name)) % 4]
    return ModuleSettings(bits=16, group_size=128, rank=rank, alpha=2 * rank)


SETTINGS = {
    "bf16 r8": ("llama", dict(batch_size=2, seq_len=48), uniform_settings(16, 8)),
    "bf16 r8 checkpointed": ("llama", dict(batch_size=2, seq_len=48, gradient_checkpointing=True), uniform_settings(16, 8)),
    "bf16 r32 long": ("llama", dict(batch_size=1, seq_len=200), uniform_settings(16, 32)),
    "bf16 r4 wide batch checkpointed": ("llama", dict(batch_size=6, seq_len=24, gradient_checkpointing=True), uniform_settings(16, 4)),
    "fp32 r16": ("llama", dict(batch_size=2, seq_len=40, compute_dtype="float32"), uniform_settings(16, 16)),
    "fp32 r8 checkpointed": ("llama", dict(batch_size=3, seq_len=40, compute_dtype="float32", gradient_checkpointing=True), uniform_settings(16, 8)),
    "bf16 dropout": ("llama", dict(batch_size=2, seq_len=48, lora_dropout=0.1), uniform_settings(16, 8)),
    "bf16 per-module ranks": ("llama", dict(batch_size=2, seq_len=56), varied_ranks),
    "qwen2 bf16 r8": ("qwen2", dict(batch_size=2, seq_len=48), uniform_settings(16, 8)),
    "qwen2 fp32 checkpointed": ("qwen2", dict(batch_size=2, seq_len=72, compute_dtype="float32", gradient_checkpointing=True), uniform_settings(16, 16)),
    "bf16 padded": ("llama", dict(batch_size=2, seq_len=48, padded_batches=True), uniform_settings(16, 8)),
    "fp32 padded": ("llama", dict(batch_size=3, seq_len=40, compute_dtype="float32", padded_batches=True), uniform_settings(16, 8)),
    "qwen2 bf16 padded": ("qwen2", dict(batch_size=2, seq_len=48, padded_batches=True), uniform_settings(16, 8)),
    "bf16 padded checkpointed": ("llama", dict(batch_size=2, seq_len=48, padded_batches=True, gradient_checkpointing=True), uniform_settings(16, 8)),
}


def measured_footprint(family, training: Training, settings_for):
    torch.manual_seed(0)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, training.compute_dtype))
    spec = spec_from_config(config)
    return spec, measure_lora_step(model, spec, settings_for, training)


@pytest.mark.parametrize("name", SETTINGS)
def test_estimate_matches_measured_footprint_within_5_percent(name):
    family, training_kwargs, settings_for = SETTINGS[name]
    training = Training(**training_kwargs)
    spec, measured = measured_footprint(family, training, settings_for)
    estimate = estimate_memory(spec, settings_for, training, Device(kind="cpu"))
    components = estimate.components
    assert components["frozen_weights"] + components["quantized_weights"] == pytest.approx(measured.frozen_bytes, rel=0.01)
    assert components["lora_parameters"] == measured.trainable_bytes
    assert components["lora_gradients"] == measured.gradient_bytes
    assert components["optimizer_state"] == measured.optimizer_bytes
    assert components["saved_activations"] == pytest.approx(measured.saved_activation_bytes, rel=0.05)
    assert estimate.persistent_bytes == pytest.approx(measured.total_bytes, rel=0.05)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_padded_batch_saves_the_attention_mask_and_k_v_at_every_head_exactly_as_modelled(family):
    """With padding, SDPA gets an explicit mask: it saves the mask (batch x 1 x T x T) and k, v expanded to every
    attention head; the tiny models have grouped k/v (fewer k/v heads than heads), so both terms show."""
    packed, padded = Training(batch_size=2, seq_len=48), Training(batch_size=2, seq_len=48, padded_batches=True)
    settings = uniform_settings(16, 8)
    spec, measured_packed = measured_footprint(family, packed, settings)
    _, measured_padded = measured_footprint(family, padded, settings)
    assert spec.num_key_value_heads < spec.num_attention_heads
    estimated = [estimate_memory(spec, settings, t, Device(kind="cpu")).components["saved_activations"] for t in (packed, padded)]
    assert estimated == [measured_packed.saved_activation_bytes, measured_padded.saved_activation_bytes]
    per_layer = 2 * 48 * 48 * 2 + 2 * 2 * 48 * (spec.num_attention_heads - spec.num_key_value_heads) * spec.head_dim * 2
    assert estimated[1] - estimated[0] == spec.num_layers * per_layer
