"""A peft LoRA adapter as llama.cpp's GGUF LoRA adapter, loaded beside the base at run time
(`llama-cli --lora`, llama-cpp-python's `lora_path`, Ollama's `ADAPTER`).

The layout is llama.cpp's own (its convert_lora_to_gguf.py writes it, its llama-adapter.cpp reads it):
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted tensor
`<base name>.lora_a` (ggml ne [n_in, r], numpy [r, n_in]: peft's A) and `<base name>.lora_b` (ne [r, n_out]:
peft's B). llama.cpp adds `scale · B(A x)` with `scale = alpha / rank` when alpha is non-zero, else the user's
scale (1 by default). qra's ranks and alphas differ per module, so alpha is written as 0 and each module's
own peft scale is folded into its B: every module then gets exactly the scale it was trained with. Llama's q/k
rows are permuted for rotary embeddings in the base, so B's rows are permuted the same way. A and B stay in
fp32, as trained.
"""

from pathlib import Path

import gguf
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PretrainedConfig

from qra.errors import QraError
from qra.runtime.package.gguf_write import architecture_of, gguf_name, gguf_names, permute_rotary, rotary_heads

ADAPTER_NAME = "default"


def lora_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted linear of a peft model by its Hugging Face module path: (A [r, in], scale · B [out, r]) in fp32."""
    pairs = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        if module.use_dora.get(ADAPTER_NAME, False):
            raise QraError(f"{name} is a DoRA layer, which llama.cpp's LoRA adapters cannot express")
        path = name.removeprefix("base_model.model.")
        a = module.lora_A[ADAPTER_NAME].weight.detach().float()
        b = module.lora_B[ADAPTER_NAME].weight.detach().float() * float(module.scaling[ADAPTER_NAME])
        pairs[path] = (a, b)
    if not pairs:
        raise QraError("the adapter holds no LoRA layer to write")
    return pairs


def write_lora_gguf(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: PretrainedConfig, path: Path) -> dict[str, int]:
    """Write `pairs` (from `lora_pairs`) as llama.cpp's GGUF LoRA adapter; returns each GGUF tensor's rank."""
    arch = architecture_of(config)
    names = gguf_names(config, arch)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp applies B as written (the scale is in B)
    ranks = {}
    for module_path, (a, b) in pairs.items():
        target = gguf_name(names, f"{module_path}.weight")
        heads = rotary_heads(module_path, config, arch)
        if heads is not None:
            b = permute_rotary(b, heads)
        writer.add_tensor(f"{target}.lora_a", a.contiguous().numpy())
        writer.add_tensor(f"{target}.lora_b", b.contiguous().numpy())
        ranks[target] = a.shape[0]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ranks
