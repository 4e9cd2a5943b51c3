"""The memory model: peak bytes of LoRA fine-tuning a mixed-bit GPTQ model, component by component.

A plan is *verified* when this estimate is within its budget. Each term below was derived from what
autograd actually saves in transformers' llama-style decoders with peft LoRA, and is checked against
the measurement harness (`qra.runtime.measure`) by the tests. Saved tensors are modelled as named
storages and counted once per name, because autograd shares them: q, k and v read one hidden state.

Persistent terms (weights, LoRA state, saved activations) are what the CPU harness measures exactly.
Transient terms (the loss's logits workspace, a recomputed layer under gradient checkpointing, the
dequantized weight of the largest module) and the fixed overhead complete the peak a GPU sees.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from qra.plans.schema import ModuleSettings, Device, Plan, Training
from qra.plans.spec import ATTENTION_INPUT, ATTENTION_OUTPUT, MLP_INPUT, MLP_OUTPUT, LinearSpec, ModelSpec, TensorSpec

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PACK_BITS = 32  # gptqmodel packs codes into int32 words
SCALE_BYTES = 2  # scales (and bias) are 16-bit in the GPTQ format
INDEX_BYTES = 4  # g_idx is int32
FP32 = 4
LABEL_BYTES = 8  # int64 token ids
CUDA_MASK_BYTES = 1  # dropout masks are bool on CUDA; on CPU they take the input dtype
# int32 elements of gptqmodel's unpacking shift table per quantized linear (its `wf` buffers: two views of
# one storage): one shift per code in a 32-bit word at 2, 4 and 8 bits, a 3x12 table at 3 bits
SHIFT_TABLE_INT32S = {2: 16, 3: 36, 4: 8, 8: 4}

SettingsFor = Callable[[int, LinearSpec], ModuleSettings]

PERSISTENT = ("quantized_weights", "frozen_weights", "lora_parameters", "lora_gradients", "optimizer_state", "saved_activations")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component; `persistent_bytes` is what the CPU harness measures, `total_bytes` the peak."""

    components: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def persistent_bytes(self) -> int:
        return sum(self.components[name] for name in PERSISTENT)

    def to_dict(self) -> dict[str, int]:
        return {"total_bytes": self.total_bytes, **self.components}


def packed_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> int:
    """Bytes of one GPTQ-quantized linear exactly as gptqmodel stores it (docs/measurements.md, memory term 1).

    qweight int32[ceil(in·bits/32), out] + qzeros int32[groups, ceil(out·bits/32)]
    + scales fp16[groups, out] + g_idx int32[in] (+ bias fp16[out]), groups = ceil(in / group_size).
    """
    group = in_features if group_size == -1 else group_size
    groups = math.ceil(in_features / group)
    qweight = math.ceil(in_features * bits / PACK_BITS) * out_features * 4
    qzeros = groups * math.ceil(out_features * bits / PACK_BITS) * 4
    scales = groups * out_features * SCALE_BYTES
    g_idx = in_features * INDEX_BYTES
    return qweight + qzeros + scales + g_idx + (out_features * SCALE_BYTES if bias else 0)


def linear_weight_bytes(module: LinearSpec, settings: ModuleSettings, compute_bytes: int) -> int:
    """Bytes of a base linear at its planned bits: dense at 16 bits; quantized, the packed tensors and the
    module's unpacking shift table (a buffer gptqmodel keeps beside them)."""
    if settings.bits == 16:
        return (module.in_features * module.out_features + (module.out_features if module.bias else 0)) * compute_bytes
    packed = packed_linear_bytes(module.in_features, module.out_features, settings.bits, settings.group_size, module.bias)
    return packed + SHIFT_TABLE_INT32S[settings.bits] * INDEX_BYTES


def lora_parameter_count(module: LinearSpec, rank: int) -> int:
    """LoRA's A [rank, in] and B [out, rank]."""
    return rank * (module.in_features + module.out_features)


def uniform_settings(bits: int, rank: int, group_size: int = 128, alpha: float | None = None) -> SettingsFor:
    settings = ModuleSettings(bits=bits, group_size=group_size, rank=rank, alpha=alpha or 2.0 * rank)
    return lambda _layer, _module: settings


def plan_settings(plan: Plan) -> SettingsFor:
    return lambda layer, module: plan.module_settings(layer, module.name)


def _weights(spec: ModelSpec, settings_for: SettingsFor, compute_bytes: int) -> tuple[int, int]:
    """(packed quantized bytes, dense frozen bytes): memory terms 1 and 2."""
    quantized = dense = 0
    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            size = linear_weight_bytes(module, settings, compute_bytes)
            if settings.bits == 16:
                dense += size
            else:
                quantized += size
    dense += sum(t.numel * _other_tensor_bytes(t, compute_bytes) for t in spec.other_tensors)
    return quantized, dense


def _other_tensor_bytes(tensor: TensorSpec, compute_bytes: int) -> int:
    """Bytes per element: parameters in the compute dtype; floating buffers (the rotary frequencies) in fp32,
    as transformers computes them and `from_pretrained` keeps them (a model cast with `.to` holds them in
    the compute dtype: then this overestimates, by a few hundred bytes)."""
    if not tensor.floating:
        return tensor.itemsize
    return FP32 if tensor.buffer else compute_bytes


def _lora_state(spec: ModelSpec, settings_for: SettingsFor, adapter_bytes: int) -> tuple[int, int, int]:
    """(parameters, gradients, AdamW state) of the adapters: memory term 3.

    AdamW keeps two moments shaped like each parameter and a 4-byte step counter per tensor.
    """
    count = tensors = 0
    for index, layer in enumerate(spec.layers):
        for module in layer:
            count += lora_parameter_count(module, settings_for(index, module).rank)
            tensors += 2
    parameters = count * adapter_bytes
    return parameters, parameters, 2 * parameters + tensors * FP32


def _layer_saved(
    spec: ModelSpec,
    layer: int,
    settings_for: SettingsFor,
    training: Training,
    device: Device,
    tokens: int,
    input_requires_grad: bool,
) -> dict[str, int]:
    """Storages one decoder layer saves for backward, by name (memory term 4, per layer).

    The hidden state entering the layer needs no gradient only in layer 0 without gradient
    checkpointing; then neither its norm nor the quantized q/k/v base path saves anything.

    A padded batch (`training.padded_batches`) gives SDPA an explicit attention mask instead of its causal
    flag. SDPA then saves the mask, batch x 1 x T x T in the compute dtype, and k and v as it receives
    them: expanded to every attention head (`repeat_kv`), not in their grouped shape (docs/measurements.md,
    "Padded batches save more for attention").
    """
    e = DTYPE_BYTES[training.compute_dtype]
    a = DTYPE_BYTES[training.adapter_dtype]
    cast = training.adapter_dtype != training.compute_dtype
    h, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_width, kv_width = spec.num_attention_heads * d, spec.num_key_value_heads * d
    if training.padded_batches:
        kv_width = q_width
    saved = {
        # RMSNorm computes in fp32: it saves the fp32 hidden state and rsqrt(variance)
        "post_attention_norm": tokens * (h * FP32 + FP32),
        # SDPA saves q, k, v, its output and the fp32 log-sum-exp per head
        "attn_q": tokens * q_width * e,
        "attn_k": tokens * kv_width * e,
        "attn_v": tokens * kv_width * e,
        "attn_out": tokens * q_width * e,
        "attn_lse": tokens * spec.num_attention_heads * FP32,
        # act(gate) * up saves gate, up and act(gate)
        "mlp_gate": tokens * inter * e,
        "mlp_up": tokens * inter * e,
        "mlp_act": tokens * inter * e,
    }
    if training.padded_batches:
        saved["attn_mask"] = training.batch_size * training.seq_len**2 * e
    if input_requires_grad:
        saved["input_norm"] = tokens * (h * FP32 + FP32)
    # the compute-dtype tensor each role reads; o_proj reads SDPA's output, already saved above
    shared_input = {
        ATTENTION_INPUT: ("attn_input", tokens * h * e),
        ATTENTION_OUTPUT: ("attn_out", tokens * q_width * e),
        MLP_INPUT: ("mlp_input", tokens * h * e),
        MLP_OUTPUT: ("mlp_hidden", tokens * inter * e),
    }
    for module in spec.layers[layer]:
        settings = settings_for(layer, module)
        name = module.short_name
        base_input_requires_grad = input_requires_grad or module.role != ATTENTION_INPUT
        # peft casts x to the adapter dtype (a copy per module), then dropout: its output, and its mask
        # where the input needs a gradient
        if training.lora_dropout > 0:
            mask = (CUDA_MASK_BYTES if device.kind == "cuda" else a) if base_input_requires_grad else 0
            saved[f"{name}_lora_input"] = tokens * module.in_features * (a + mask)
        elif cast:
            saved[f"{name}_lora_input"] = tokens * module.in_features * a
        else:
            key, size = shared_input[module.role]
            saved[key] = size
        saved[f"{name}_lora_hidden"] = tokens * settings.rank * a
        # a quantized base re-dequantized in backward saves nothing (its weight is frozen, so backward
        # needs only the weight); the plain path saves the dequantized weight where x needs a gradient
        if settings.bits != 16 and base_input_requires_grad and not training.dequantize_in_backward:
            saved[f"{name}_dequantized_weight"] = module.in_features * module.out_features * e
    return saved


def _saved_activations(spec: ModelSpec, settings_for: SettingsFor, training: Training, device: Device) -> int:
    """Everything the graph keeps between forward and backward (memory term 4), and the loss's
    saved log-probabilities (term 5, its persistent part)."""
    e = DTYPE_BYTES[training.compute_dtype]
    tokens = training.batch_size * training.seq_len
    final_norm = tokens * (spec.hidden_size * FP32 + FP32)
    # the loss pads the labels by one position and slices them shifted; with one sequence the slice is
    # contiguous and keeps the padded storage, one label longer
    labels = (tokens + (1 if training.batch_size == 1 else 0)) * LABEL_BYTES
    loss = tokens * spec.vocab_size * FP32 + labels + FP32
    if training.gradient_checkpointing:
        layer_inputs = spec.num_layers * tokens * spec.hidden_size * e
        return layer_inputs + final_norm + loss
    rotary = 2 * training.seq_len * spec.head_dim * e
    layers = sum(
        sum(_layer_saved(spec, i, settings_for, training, device, tokens, input_requires_grad=i > 0).values())
        for i in range(spec.num_layers)
    )
    return layers + rotary + final_norm + loss


def _transients(spec: ModelSpec, settings_for: SettingsFor, training: Training, device: Device) -> dict[str, int]:
    """Short-lived peaks on top of the persistent terms (terms 4 and 5, transient parts).

    logits: the compute-dtype logits and their fp32 upcast live together while the loss runs;
    recompute: under checkpointing, backward re-runs one layer and holds all it saves;
    dequantize: the largest quantized module's weight, dequantized for one matmul.
    """
    e = DTYPE_BYTES[training.compute_dtype]
    tokens = training.batch_size * training.seq_len
    logits = tokens * spec.vocab_size * (e + FP32 if e != FP32 else FP32)
    recompute = 0
    if training.gradient_checkpointing:
        recompute = max(
            sum(_layer_saved(spec, i, settings_for, training, device, tokens, input_requires_grad=True).values())
            for i in range(spec.num_layers)
        )
    quantized = [
        m.in_features * m.out_features * e
        for i, layer in enumerate(spec.layers)
        for m in layer
        if settings_for(i, m).bits != 16
    ]
    return {"logits_workspace": logits, "recompute_workspace": recompute, "dequantize_workspace": max(quantized, default=0)}


def estimate_memory(
    spec: ModelSpec,
    settings_for: SettingsFor,
    training: Training,
    device: Device,
) -> MemoryEstimate:
    """Peak bytes of fine-tuning `spec` with per-module bits and ranks from `settings_for`.

    Terms, as in docs/measurements.md: 1 packed quantized weights, 2 unquantized tensors, 3 LoRA parameters,
    gradients and AdamW state, 4 saved activations, 5 logits and loss, 6 fixed overhead (context,
    and allocator slack as a fraction of everything that is allocated and freed during the step).
    """
    compute_bytes = DTYPE_BYTES[training.compute_dtype]
    quantized, dense = _weights(spec, settings_for, compute_bytes)
    parameters, gradients, optimizer = _lora_state(spec, settings_for, DTYPE_BYTES[training.adapter_dtype])
    activations = _saved_activations(spec, settings_for, training, device)
    transients = _transients(spec, settings_for, training, device)
    dynamic = gradients + activations + sum(transients.values())
    return MemoryEstimate(
        components={
            "quantized_weights": quantized,
            "frozen_weights": dense,
            "lora_parameters": parameters,
            "lora_gradients": gradients,
            "optimizer_state": optimizer,
            "saved_activations": activations,
            **transients,
            "context": device.context_bytes,
            "allocator_slack": int(device.allocator_slack * dynamic),
        }
    )


def estimate_plan(spec: ModelSpec, plan: Plan) -> MemoryEstimate:
    return estimate_memory(spec, plan_settings(plan), plan.training, plan.device)
