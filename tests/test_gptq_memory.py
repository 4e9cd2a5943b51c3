"""Quantized modules: packed bytes equal the memory model's to the byte; training through gptqmodel keeps
dequantized weights (the trap) unless the memory-faithful path is on; both paths are predicted."""

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoModelForCausalLM

from qra.plans.memory import estimate_memory, packed_linear_bytes
from qra.plans.schema import Device, ModuleSettings, Training
from qra.plans.spec import ModelSpec
from qra.runtime.lora import attach_lora
from qra.runtime.measure import measure_lora_step
from qra.runtime.qlinear import enable_dequantize_in_backward
from qra.runtime.quantize import load_quantized, placeholder_quantized, quantize_to_plan
from qra.testing import save_tiny_model, tiny_spec

# every layer gets its own bits, and layers alternate group sizes: 2/3/4/8 bits x group 32/64
LAYER_SETTINGS = [(2, 32), (3, 64), (4, 32), (8, 64), (2, 64), (3, 32), (4, 64), (8, 32)]


class Quantized(NamedTuple):
    spec: ModelSpec
    checkpoint: Path
    float_model: Path


def planned(layer, _module):
    bits, group_size = LAYER_SETTINGS[layer]
    return ModuleSettings(bits=bits, group_size=group_size, rank=8, alpha=16)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def quantized(request, tmp_path_factory):
    family = request.param
    folder = save_tiny_model(tmp_path_factory.mktemp(family), family, layers=len(LAYER_SETTINGS))
    spec = tiny_spec(family, layers=len(LAYER_SETTINGS))
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 320, (64,), generator=generator).tolist() for _ in range(8)]
    output = quantize_to_plan(folder, spec, planned, calibration, tmp_path_factory.mktemp(f"{family}-gptq"))
    return Quantized(spec, output, folder)


def test_every_module_is_quantized_to_its_planned_bits_and_group_size(quantized):
    spec, checkpoint = quantized.spec, quantized.checkpoint
    modules = dict(load_quantized(checkpoint).model.named_modules())
    for index, layer in enumerate(spec.layers):
        for module in layer:
            real = modules[spec.module_path(index, module)]
            assert (real.bits, real.group_size) == LAYER_SETTINGS[index], spec.module_path(index, module)


def test_packed_bytes_match_real_modules_to_the_byte(quantized):
    spec, checkpoint = quantized.spec, quantized.checkpoint
    modules = dict(load_quantized(checkpoint).model.named_modules())
    for index, layer in enumerate(spec.layers):
        bits, group_size = LAYER_SETTINGS[index]
        for module in layer:
            real = modules[spec.module_path(index, module)]
            stored = ["qweight", "qzeros", "scales", "g_idx"] + (["bias"] if real.bias is not None else [])
            real_bytes = sum(getattr(real, name).nbytes for name in stored)
            assert packed_linear_bytes(module.in_features, module.out_features, bits, group_size, module.bias) == real_bytes


def test_plain_gptqmodel_training_keeps_dequantized_weights_and_the_model_predicts_it(quantized):
    """The trap in docs/measurements.md, shown by the harness: gptqmodel's TORCH layers save each dequantized weight for
    backward. The memory model with `dequantize_in_backward=False` describes exactly that path."""
    spec, checkpoint = quantized.spec, quantized.checkpoint
    model = load_quantized(checkpoint).model
    training = Training(batch_size=2, seq_len=40, dequantize_in_backward=False)
    measured = measure_lora_step(model, spec, planned, training)

    # every quantized module but layer 0's q/k/v (whose input needs no gradient) keeps its weight
    dequantized = sum(
        m.in_features * m.out_features * 2
        for i, layer in enumerate(spec.layers)
        for m in layer
        if i > 0 or m.role != "attention_input"
    )
    assert measured.saved_weight_like_bytes == dequantized
    estimate = estimate_memory(spec, planned, training, Device(kind="cpu"))
    assert estimate.components["saved_activations"] == pytest.approx(measured.saved_activation_bytes, rel=0.05)


def test_memory_faithful_path_keeps_no_dequantized_weight_and_the_model_predicts_it(quantized):
    """With `enable_dequantize_in_backward`, no weight-shaped tensor is saved for backward, and the
    saved activations match the memory model's default (dequantize_in_backward=True)."""
    spec, checkpoint = quantized.spec, quantized.checkpoint
    model = load_quantized(checkpoint).model
    assert enable_dequantize_in_backward(model) == sum(len(layer) for layer in spec.layers)
    training = Training(batch_size=2, seq_len=40)
    measured = measure_lora_step(model, spec, planned, training)
    assert measured.saved_weight_like_bytes == 0
    estimate = estimate_memory(spec, planned, training, Device(kind="cpu"))
    assert estimate.components["saved_activations"] == pytest.approx(measured.saved_activation_bytes, rel=0.05)
    assert estimate.persistent_bytes == pytest.approx(measured.total_bytes, rel=0.05)


def test_memory_faithful_path_gives_the_same_loss_and_gradients_as_the_plain_path(quantized):
    spec, checkpoint = quantized.spec, quantized.checkpoint
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for faithful in (False, True):
        model = load_quantized(checkpoint).model
        model.config.use_cache = False
        if faithful:
            enable_dequantize_in_backward(model)
        torch.manual_seed(0)
        peft_model = attach_lora(model, spec, planned)
        peft_model.train()
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give it values so that every gradient flows
                torch.nn.init.normal_(parameter, std=0.02)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    (plain_loss, plain_grads), (faithful_loss, faithful_grads) = results
    assert faithful_loss == pytest.approx(plain_loss, rel=1e-3)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(faithful_grads[name], grad, rtol=2e-2, atol=1e-4)


def test_a_placeholder_quantization_holds_the_real_ones_tensors_and_its_training_step_measures_the_same(quantized):
    """What the quality benchmark measures memory on: gptqmodel's packed modules at the planned bits, filled
    with zeros instead of a GPTQ pass. Memory depends on shapes and dtypes only, so the step measures alike."""
    real = load_quantized(quantized.checkpoint).model
    float_model = AutoModelForCausalLM.from_pretrained(quantized.float_model, dtype=torch.bfloat16)
    placeholder = placeholder_quantized(float_model, quantized.spec, planned)

    def tensors(model):
        return {name: (tuple(t.shape), t.dtype) for name, t in [*model.named_parameters(), *model.named_buffers()]}

    assert tensors(placeholder) == tensors(real)
    training = Training(batch_size=2, seq_len=40)
    steps = []
    for model in (real, placeholder):
        enable_dequantize_in_backward(model)
        steps.append(measure_lora_step(model, quantized.spec, planned, training))
    assert steps[0].to_dict() == steps[1].to_dict()


def test_weights_and_buffers_of_a_quantized_model_are_estimated_to_the_byte(quantized):
    """Everything frozen that a quantized model holds: packed tensors, gptqmodel's unpacking shift tables
    (a small buffer per module), 16-bit tensors and the rotary buffer; a plan must not be over by a byte."""
    model = load_quantized(quantized.checkpoint).model
    enable_dequantize_in_backward(model)
    training = Training(batch_size=2, seq_len=40)
    measured = measure_lora_step(model, quantized.spec, planned, training)
    components = estimate_memory(quantized.spec, planned, training, Device(kind="cpu")).components
    assert components["quantized_weights"] + components["frozen_weights"] == measured.frozen_bytes
    assert estimate_memory(quantized.spec, planned, training, Device(kind="cpu")).persistent_bytes == measured.total_bytes
