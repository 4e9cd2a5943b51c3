"""The `onnx` format: the merged model exported with torch's dynamo exporter, checked, and verified.

The export runs in fp32 without KV cache: one input, `input_ids` [batch, sequence] (both dynamic),
one output, `logits` [batch, sequence, vocab]. After export the graph passes `onnx.checker`, and
onnxruntime's logits on a tokenized sentence are compared with torch's; the largest absolute
difference is recorded in the manifest.
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from qra.runtime.package.context import Workspace
from qra.runtime.package.merged import merged_folder
from qra.runtime.package.serving import sequence_sums, serving_record

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog, then returns the value of the function."

HOW_TO_LOAD = f"""```python
import onnxruntime
from transformers import AutoTokenizer

session = onnxruntime.InferenceSession("path/to/onnx/{MODEL_FILE}")
tokenizer = AutoTokenizer.from_pretrained("path/to/onnx")
ids = tokenizer("Hello", return_tensors="np").input_ids
logits = session.run(["logits"], {{"input_ids": ids}})[0]
```

Full-sequence logits in fp32, no KV cache."""


class LogitsOnly(nn.Module):
    """A causal LM as `input_ids -> logits`, without cache: the one graph the ONNX file holds."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def load_fp32(folder: Path) -> LogitsOnly:
    """The merged model in fp32, in eval mode, without KV cache."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    return LogitsOnly(model).eval()


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    return tokenizer(CHECK_TEXT, return_tensors="pt").input_ids


def export(module: LogitsOnly, ids: torch.Tensor, path: Path) -> None:
    """Export with dynamic batch and sequence axes; the example is `ids` twice, so no axis is 1 and specializes."""
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with torch.no_grad():
        torch.onnx.export(
            module,
            (ids.repeat(2, 1),),
            str(path),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": dims},
            verbose=False,
        )


def max_logit_difference(module: LogitsOnly, path: Path, ids: torch.Tensor) -> float:
    """Largest |onnxruntime logits - torch logits| on `ids`."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = module(ids)
    return (torch.from_numpy(logits) - expected).abs().max().item()


def build(work: Workspace, folder: Path) -> dict[str, Any]:
    """Export, check and verify the merged model into `folder`, with its config and tokenizer."""
    source = merged_folder(work)
    module = load_fp32(source)
    path = folder / MODEL_FILE
    ids = _token_ids(work.ctx.tokenizer)
    export(module, ids, path)
    onnx.checker.check_model(str(path))
    difference = max_logit_difference(module, path, ids)
    logger.info("onnx logits differ from torch by at most %.3g", difference)
    module.model.config.save_pretrained(folder)
    work.ctx.tokenizer.save_pretrained(folder)
    serving = None
    if work.ctx.held_out:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def logits_of(sequence: list[int]) -> np.ndarray:
            return session.run(["logits"], {"input_ids": np.array([sequence], dtype=np.int64)})[0][0]

        serving = serving_record("onnxruntime (fp32)", sequence_sums(logits_of, work.ctx.held_out), work.ctx.trained_sums)
    opset = {entry.domain or "ai.onnx": entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import}
    return {
        "onnx": {
            "dtype": "float32",
            "inputs": {"input_ids": ["batch", "sequence"]},
            "outputs": {"logits": ["batch", "sequence", "vocab"]},
            "opset": opset,
            "check_text": CHECK_TEXT,
            "max_abs_logit_difference": difference,
        },
        **({"serving": serving} if serving is not None else {}),
    }
