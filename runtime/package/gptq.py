"""The `gptq` format: the merged model GPTQ-quantized again, each module to its planned bits.

The checkpoint's `dynamic` config names every module with its bits and group size, so gptqmodel
and vLLM load each module at its own precision.
"""

import os
from collections import Counter
from pathlib import Path
from typing import Any

from qra.runtime.package.context import Workspace
from qra.runtime.package.merged import merged_folder
from qra.runtime.heldout import held_out_sums
from qra.runtime.package.serving import serving_record
from qra.runtime.quantize import load_quantized, quantize_to_plan

HOW_TO_LOAD = """```python
import torch
from gptqmodel import BACKEND, GPTQModel

model = GPTQModel.load("path/to/gptq", backend=BACKEND.TORCH, dtype=torch.bfloat16)
```

A mixed-bit checkpoint loads through gptqmodel (or vLLM, which reads `dynamic`), not through
`AutoModelForCausalLM.from_pretrained`."""


def build(work: Workspace, folder: Path) -> dict[str, Any]:
    """Quantize the merged model into `folder` with the plan's per-module bits and group sizes."""
    ctx = work.ctx
    # quantized in scratch, then moved: gptqmodel's log lands beside its output folder, not in the package
    checkpoint = quantize_to_plan(merged_folder(work), ctx.spec, ctx.settings_for, ctx.calibration, work.scratch / "gptq")
    for item in checkpoint.iterdir():
        os.replace(item, folder / item.name)
    bits = Counter(
        ctx.settings_for(index, module).bits for index, layer in enumerate(ctx.spec.layers) for module in layer
    )
    details: dict[str, Any] = {"modules_by_bits": {str(b): count for b, count in sorted(bits.items())}}
    if ctx.held_out:
        model = load_quantized(folder).model
        details["serving"] = serving_record("gptqmodel (TORCH, bf16)", held_out_sums(model, ctx.held_out), ctx.trained_sums)
    return details
