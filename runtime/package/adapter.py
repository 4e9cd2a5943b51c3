"""The `adapter` format: the quantized base exactly as trained, with the LoRA adapter and the plan.

The folder is the gptqmodel checkpoint itself (so gptqmodel loads it as it is), plus `adapter/`
(peft's files), `plan.yaml` and the tokenizer.
"""

import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel

from qra.runtime.package.context import Workspace
from qra.runtime.package.serving import serving_record
from qra.runtime.quantize import load_quantized

ADAPTER = "adapter"
PLAN = "plan.yaml"

HOW_TO_LOAD = f"""```python
from qra.runtime.package.adapter import load_adapter_package

model = load_adapter_package("path/to/adapter")  # a peft model over the mixed-bit GPTQ base
```

Without qra: `GPTQModel.load("path/to/adapter", backend=BACKEND.TORCH, dtype=torch.bfloat16)`, then
`PeftModel.from_pretrained(quantized.model, "path/to/adapter/{ADAPTER}")`."""


def build(work: Workspace, folder: Path) -> dict[str, Any]:
    """Copy the quantized base into `folder`, the adapter into `folder/adapter`, and add the plan and tokenizer."""
    ctx = work.ctx
    shutil.copytree(ctx.quantized, folder, dirs_exist_ok=True)
    shutil.copytree(ctx.adapter, folder / ADAPTER)
    (folder / PLAN).write_text(ctx.plan_yaml, encoding="utf-8")
    ctx.tokenizer.save_pretrained(folder)
    details: dict[str, Any] = {"layout": {"base": ".", "adapter": ADAPTER, "plan": PLAN}}
    if ctx.trained_sums is not None:  # this is the trained model: its runtime is the one that trained it
        details["serving"] = serving_record("qra (gptqmodel + peft)", ctx.trained_sums, ctx.trained_sums)
    return details


def load_adapter_package(folder: Path, dtype: str = "bfloat16") -> PeftModel:
    """The packaged quantized base (gptqmodel, TORCH backend) with its adapter loaded by peft."""
    base = load_quantized(Path(folder), dtype).model
    return PeftModel.from_pretrained(base, str(Path(folder) / ADAPTER))
