"""The `gguf` format: what llama.cpp, Ollama and LM Studio serve.

By default it serves exactly the model that was trained, in two files:
- `model.gguf`: the trained GPTQ base transcoded into GGML blocks without re-quantizing (`gguf_exact`):
  Q4_0 for 2-4 bit modules, Q8_0 for 8-bit ones, everything else at the precision the run held it in;
- `adapter.gguf`: the LoRA adapter as llama.cpp's GGUF LoRA adapter (`gguf_lora`), applied at run time.

With a `--gguf-mix` (`plan`, or one of llama.cpp's recipes such as `q4_k_m`), the adapter is merged instead
and the merged model re-quantized into one file (`gguf_mix`): smaller or simpler to ship, and lossy.

Either way the built files are run in llama.cpp: their logits on a fixed text are compared with the trained
model's, and, given the held-out set, their held-out loss is measured against the trained model's
(`serving`), all in the manifest.
"""

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qra.plans.memory import SettingsFor
from qra.plans.spec import ModelSpec
from qra.runtime.package.context import PackageContext, Workspace
from qra.runtime.package.gguf_exact import base_tensors, check_transcodable, file_type
from qra.runtime.package.gguf_lora import lora_pairs, write_lora_gguf
from qra.runtime.package.gguf_mix import check_mix, llama_cpp, write_mix
from qra.runtime.package.gguf_write import Written, architecture_of, check_model_type, write_bf16_gguf, write_gguf
from qra.runtime.package.merged import merged_folder
from qra.runtime.package.serving import llama_cpp_logits_of, sequence_sums, serving_record
from qra.runtime.quantize import load_quantized

logger = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog, then returns the value of the function."


def how_to_load(ctx: PackageContext) -> str:
    """The model card's loading section, for the exact pair or a single mixed file."""
    if ctx.gguf_mix is not None:
        return f"""One file, the adapter merged and re-quantized by llama.cpp (`--gguf-mix {ctx.gguf_mix}`; lossy:
`manifest.json` records its held-out loss against the trained model's).

```bash
llama-cli -m path/to/gguf/{MODEL_FILE} -p "Hello"
ollama create my-model -f path/to/gguf/{MODELFILE} && ollama run my-model
```"""
    return f"""The trained base, transcoded without re-quantizing (`{MODEL_FILE}`), and its LoRA adapter
(`{ADAPTER_FILE}`), applied by llama.cpp at run time:

```bash
llama-cli -m path/to/gguf/{MODEL_FILE} --lora path/to/gguf/{ADAPTER_FILE} -p "Hello"
```

llama-cpp-python:

```python
from llama_cpp import Llama

llm = Llama(model_path="path/to/gguf/{MODEL_FILE}", lora_path="path/to/gguf/{ADAPTER_FILE}")
print(llm("Hello", max_tokens=32)["choices"][0]["text"])
```

Ollama, with the `{MODELFILE}` in this folder (`FROM ./{MODEL_FILE}`, `ADAPTER ./{ADAPTER_FILE}`; the chat
template comes from the file):

```bash
ollama create my-model -f path/to/gguf/{MODELFILE} && ollama run my-model
```

The tokenizer and chat template are in the file; each tensor's type, and the measured held-out loss in
llama.cpp against the trained model's, are in `manifest.json`."""


def check(spec: ModelSpec, config: PretrainedConfig | None = None, settings_for: SettingsFor | None = None,
          gguf_mix: str | None = None) -> None:
    """What is checked before any training: llama-cpp-python is there, llama.cpp knows the model (its family;
    with its config, its rotary embeddings), and the plan can be served exactly (or the mix is known)."""
    llama_cpp()
    check_model_type(spec.model_type)
    if config is not None:
        architecture_of(config)
    if gguf_mix is not None:
        check_mix(gguf_mix)
    elif settings_for is not None:
        check_transcodable(spec, settings_for)


def tensor_types(path: Path) -> dict[str, gguf.GGMLQuantizationType]:
    """Every tensor of a GGUF file and its type, as the file says."""
    return {tensor.name: gguf.GGMLQuantizationType(tensor.tensor_type) for tensor in gguf.GGUFReader(str(path)).tensors}


def bits_per_weight(path: Path) -> float:
    """Bits of tensor data per weight over every tensor in the file (llama.cpp's BPW)."""
    tensors = gguf.GGUFReader(str(path)).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def llama_cpp_logits(path: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` ([len(ids), vocab]), CPU only, with the adapter if given."""
    logits_of, close = llama_cpp_logits_of(path, adapter, context=max(64, len(ids)))
    try:
        return logits_of(ids)
    finally:
        close()


def model_logits(model: PreTrainedModel, ids: list[int]) -> np.ndarray:
    """A torch model's logits, as fp32, for every position of `ids`."""
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def agreement(gguf_logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close llama.cpp's logits are to the reference's: largest absolute difference, the same relative to
    the reference's spread, and the share of positions whose top token agrees."""
    difference = float(np.abs(gguf_logits - reference).max())
    return {
        "max_abs_logit_difference": difference,
        "relative_difference": difference / float(reference.std()),
        "top1_agreement": float((gguf_logits.argmax(-1) == reference.argmax(-1)).mean()),
    }


def bf16_gguf(merged: Path, tokenizer: PreTrainedTokenizerBase, path: Path, name: str, source_gguf: Path | None) -> Written:
    """The merged model folder written as a BF16 GGUF (lossless: the merged weights are bf16)."""
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    return write_bf16_gguf(model, tokenizer, merged, path, name, source_gguf)


def trained_base(ctx: PackageContext) -> PreTrainedModel:
    """The base as qra trained on it: gptqmodel's TORCH backend in bf16, or the plain model for a 16-bit plan."""
    if (Path(ctx.quantized) / "quantize_config.json").is_file():
        return load_quantized(ctx.quantized).model
    return AutoModelForCausalLM.from_pretrained(ctx.quantized, dtype=torch.bfloat16)


def _tokenizer_folder(work: Workspace) -> Path:
    folder = work.scratch / "tokenizer"
    if not folder.is_dir():
        work.ctx.tokenizer.save_pretrained(folder)
    return folder


def _build_exact(work: Workspace, folder: Path) -> tuple[dict[str, Any], np.ndarray]:
    """The transcoded base and the adapter into `folder`; returns the manifest's details and the trained
    model's logits on the check text."""
    ctx = work.ctx
    base = trained_base(ctx)
    tensors = base_tensors(base)
    model = PeftModel.from_pretrained(base, str(ctx.adapter)).eval()
    written = write_gguf(tensors, base.config, ctx.tokenizer, _tokenizer_folder(work), folder / MODEL_FILE,
                         f"{ctx.plan.model.id} (qra)", ctx.source_gguf, file_type(tensors))
    ranks = write_lora_gguf(lora_pairs(model), base.config, folder / ADAPTER_FILE)
    reference = model_logits(model, ctx.tokenizer(CHECK_TEXT).input_ids)
    (folder / MODELFILE).write_text(f"FROM ./{MODEL_FILE}\nADAPTER ./{ADAPTER_FILE}\n", encoding="utf-8")
    details = {
        "exact": True,
        "file": MODEL_FILE,
        "adapter": ADAPTER_FILE,
        "architecture": written.architecture,
        "pre_tokenizer": written.pre_tokenizer,
        "bits_per_weight": bits_per_weight(folder / MODEL_FILE),
        "file_bytes": (folder / MODEL_FILE).stat().st_size,
        "adapter_bytes": (folder / ADAPTER_FILE).stat().st_size,
        "tensor_types": {name: qtype.name for name, qtype in tensor_types(folder / MODEL_FILE).items()},
        "adapter_ranks": ranks,
    }
    return details, reference


def _build_mix(work: Workspace, folder: Path) -> tuple[dict[str, Any], np.ndarray]:
    """The merged model re-quantized by the requested mix into `folder`; returns the manifest's details and
    the trained model's logits on the check text (of the merged bf16 model, loaded once for writing)."""
    ctx = work.ctx
    source = merged_folder(work)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    written = write_bf16_gguf(model, ctx.tokenizer, source, work.scratch / "model-bf16.gguf", f"{ctx.plan.model.id} (qra)",
                              ctx.source_gguf)
    reference = model_logits(model, ctx.tokenizer(CHECK_TEXT).input_ids)
    del model
    target = folder / MODEL_FILE
    mixed = write_mix(written, target, ctx.gguf_mix, ctx.spec, ctx.settings_for)
    (folder / MODELFILE).write_text(f"FROM ./{MODEL_FILE}\n", encoding="utf-8")
    details = {
        "exact": False,
        "file": MODEL_FILE,
        "architecture": written.architecture,
        "pre_tokenizer": written.pre_tokenizer,
        "bits_per_weight": bits_per_weight(target),
        "file_bytes": target.stat().st_size,
        "tensor_types": {name: qtype.name for name, qtype in tensor_types(target).items()},
        **mixed,
    }
    return details, reference


def build(work: Workspace, folder: Path) -> dict[str, Any]:
    """Build the exact pair (or the requested mix) into `folder`, then run it in llama.cpp: its logits on the
    check text against the trained model's, and its held-out loss when the context has the held-out set."""
    ctx = work.ctx
    details, reference = (_build_exact if ctx.gguf_mix is None else _build_mix)(work, folder)
    adapter = folder / ADAPTER_FILE if ctx.gguf_mix is None else None
    ids = ctx.tokenizer(CHECK_TEXT).input_ids
    details.update(check_text=CHECK_TEXT, **agreement(llama_cpp_logits(folder / MODEL_FILE, ids, adapter), reference))
    logger.info("gguf logits differ from the trained model's by at most %.3g (top-1 agreement %.0f%%)",
                details["max_abs_logit_difference"], 100 * details["top1_agreement"])
    result: dict[str, Any] = {"gguf": details}
    if ctx.held_out:
        logits_of, close = llama_cpp_logits_of(folder / MODEL_FILE, adapter, context=ctx.plan.training.seq_len)
        try:
            result["serving"] = serving_record("llama.cpp", sequence_sums(logits_of, ctx.held_out), ctx.trained_sums)
        finally:
            close()
    return result
