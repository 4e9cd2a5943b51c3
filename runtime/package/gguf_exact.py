"""The trained GPTQ base as GGUF without re-quantizing: every quantized linear's integers and scales become
GGML blocks (`ggml_blocks`), every other tensor is written at the precision the run held it in.

A quantized linear computes with `s · (q − z)`, `s` the scale its runtime holds (bf16 when the run trained in
bf16). Q4_0 and Q8_0 hold that product exactly when every 32-block of input columns lies in one group, `q − z`
fits the block's codes, and `s` is an fp16 number; the transcoder checks all three per module and refuses
what it cannot write exactly. llama.cpp then dequantizes to `s · (q − z)` in fp32, which rounds to the very
bf16 weight the run trained on.
"""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from qra.errors import QraError
from qra.plans.memory import SettingsFor
from qra.plans.spec import ModelSpec
from qra.runtime.package.ggml_blocks import BLOCK, block_type, encode
from qra.runtime.package.gguf_write import Encoded, Tensor
from qra.runtime.qlinear import is_gptq_linear

LOSSY_OPTION = "--gguf-mix q4_k_m (or q8_0, plan): a merged, re-quantized single file"


@dataclass(frozen=True)
class Integers:
    """A GPTQ linear as integers: `q − z` [out, in] and one scale per 32-block [out, in / 32], in the dtype the
    module computes with."""

    differences: torch.Tensor
    block_scales: torch.Tensor
    bits: int


def check_transcodable(spec: ModelSpec, settings_for: SettingsFor) -> None:
    """A QraError, before any training, when a planned module cannot be transcoded exactly: its group size or
    its row length is not a multiple of GGML's 32-weight block."""
    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            if settings.bits == 16:
                continue
            group = module.in_features if settings.group_size == -1 else settings.group_size
            if group % BLOCK or module.in_features % BLOCK:
                raise QraError(
                    f"{spec.module_path(index, module)} (group size {settings.group_size}, rows of {module.in_features}) "
                    f"cannot be served exactly in GGUF, whose blocks hold {BLOCK} weights of one scale; "
                    f"use {LOSSY_OPTION}"
                )


def _codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed weight codes q [in, out] and zero points z [groups, out], unpacked by gptqmodel itself: its
    generic dequantizer is run with the step that applies the scales intercepted."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    captured: dict[str, torch.Tensor] = {}

    def keep(weight: torch.Tensor, zeros: torch.Tensor, num_itr: int = 1) -> torch.Tensor:
        captured.update(weight=weight[: module.in_features], zeros=zeros)
        return weight

    module._dequantize_from_codes = keep
    try:
        PackableQuantLinear.dequantize_weight(module)
    finally:
        del module._dequantize_from_codes
    return captured["weight"].long(), captured["zeros"].long()


def integers(module: nn.Module, name: str) -> Integers:
    """A gptqmodel linear's integers and per-block scales, checked to reproduce the module's own dequantized
    weight to the bit; a QraError naming the lossy option where they cannot."""
    q, z = _codes(module)
    g_idx = module.g_idx.long()[: module.in_features]
    differences = (q - z[g_idx]).t().contiguous()  # [out, in]
    blocks = g_idx.reshape(-1, BLOCK)
    if module.in_features % BLOCK or bool((blocks != blocks[:, :1]).any()):
        raise QraError(f"{name}: a {BLOCK}-weight block spans two GPTQ groups (act-order or an odd group size); "
                       f"it cannot be served exactly in GGUF: use {LOSSY_OPTION}")
    block_scales = module.scales[blocks[:, 0]].t().contiguous()  # [out, in / 32]
    weight = (module.scales[g_idx] * (q - z[g_idx]).to(module.scales.dtype)).t()
    if not torch.equal(weight, module.dequantize_weight().t().to(weight.dtype)):
        raise QraError(f"{name}: gptqmodel's dequantized weight is not scale · (q − z); it cannot be transcoded exactly")
    return Integers(differences, block_scales, module.bits)


def transcode(module: nn.Module, name: str) -> Encoded:
    """A gptqmodel linear as GGML blocks (Q4_0 up to 4 bits, Q8_0 at 8) holding exactly the weight it computes with."""
    found = integers(module, name)
    scales = found.block_scales.float().numpy().astype(np.float16)
    if not np.array_equal(scales.astype(np.float32), found.block_scales.float().numpy()):
        raise QraError(f"{name}: a scale is not an fp16 number (out of fp16's range); it cannot be served exactly "
                       f"in GGUF: use {LOSSY_OPTION}")
    qtype = block_type(found.bits)
    try:
        return Encoded(encode(found.differences.numpy(), scales, qtype), qtype)
    except ValueError as error:
        raise QraError(f"{name}: {error} (an asymmetric quantization?); use {LOSSY_OPTION}") from None


def base_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of a loaded gptqmodel checkpoint by Hugging Face parameter name: each quantized linear's
    weight transcoded, its bias and every other tensor as the model holds it."""
    quantized = {name: module for name, module in model.named_modules() if is_gptq_linear(module)}
    tensors: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in quantized:
            tensors[name] = tensor
    for name, module in quantized.items():
        tensors[f"{name}.weight"] = transcode(module, name)
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach()
    return tensors


def file_type(tensors: dict[str, Tensor]) -> gguf.LlamaFileType:
    """The file's nominal type: the block type holding the most encoded weights; BF16 when none are encoded."""
    weights = {gguf.GGMLQuantizationType.Q4_0: 0, gguf.GGMLQuantizationType.Q8_0: 0}
    for tensor in tensors.values():
        if isinstance(tensor, Encoded):
            weights[tensor.qtype] += tensor.data.size
    if not any(weights.values()):
        return gguf.LlamaFileType.MOSTLY_BF16
    most = max(weights, key=weights.__getitem__)
    return gguf.LlamaFileType.MOSTLY_Q8_0 if most == gguf.GGMLQuantizationType.Q8_0 else gguf.LlamaFileType.MOSTLY_Q4_0


def quantized_folder_tensors(folder: Path) -> dict[str, Tensor]:
    """`base_tensors` of the gptqmodel checkpoint in `folder` (loaded with the TORCH backend, in bf16)."""
    from qra.runtime.quantize import load_quantized

    return base_tensors(load_quantized(folder).model)
