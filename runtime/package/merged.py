"""The `merged` format: the LoRA merged into a dense bf16 model that plain transformers loads.

peft refuses `merge_and_unload()` on quantized layers, so each GPTQ linear is first replaced by an
`nn.Linear` holding exactly the weight the quantized layer computes with (its dequantized weight),
then the adapter is loaded onto that plain model and merged.
"""

import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from qra.runtime.heldout import held_out_sums
from qra.runtime.package.context import PackageContext, Workspace
from qra.runtime.package.serving import serving_record
from qra.runtime.qlinear import is_gptq_linear
from qra.runtime.quantize import load_quantized

DTYPE_NAME = "bfloat16"
DTYPE = getattr(torch, DTYPE_NAME)

HOW_TO_LOAD = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/merged", dtype="bfloat16")
tokenizer = AutoTokenizer.from_pretrained("path/to/merged")
```"""


def _dense(module: nn.Module) -> nn.Linear:
    """An nn.Linear with the GPTQ module's dequantized weight (gptqmodel returns it as [in, out])."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.dequantize_weight().t().contiguous().to(DTYPE), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(DTYPE), requires_grad=False)
    return linear


def dequantized_model(quantized: Path) -> PreTrainedModel:
    """The gptqmodel checkpoint as a plain transformers model in bf16, one module dequantized at a time."""
    model = load_quantized(quantized).model
    for name, module in list(model.named_modules()):
        if is_gptq_linear(module):
            model.set_submodule(name, _dense(module))
    del model.config.quantization_config
    # gptqmodel records a device map; left in place, transformers treats the model as offloaded on save
    model.__dict__.pop("hf_device_map", None)
    return model


def merged_model(ctx: PackageContext) -> PreTrainedModel:
    """The dequantized base with the adapter merged in."""
    peft_model = PeftModel.from_pretrained(dequantized_model(ctx.quantized), str(ctx.adapter))
    return peft_model.merge_and_unload()


def merged_folder(work: Workspace) -> Path:
    """The merged model saved in the workspace's scratch folder, built on first use."""
    if work.merged is None:
        folder = work.scratch / "merged"
        merged_model(work.ctx).save_pretrained(folder)
        work.ctx.tokenizer.save_pretrained(folder)
        work.merged = folder
    return work.merged


def build(work: Workspace, folder: Path) -> dict[str, Any]:
    """Write the merged model and tokenizer into `folder`."""
    shutil.copytree(merged_folder(work), folder, dirs_exist_ok=True)
    details: dict[str, Any] = {"dtype": DTYPE_NAME}
    if work.ctx.held_out:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE)
        details["serving"] = serving_record("transformers (bf16)", held_out_sums(model, work.ctx.held_out), work.ctx.trained_sums)
    return details
