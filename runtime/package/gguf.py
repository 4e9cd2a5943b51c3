"""The `gguf` format: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio, each decoder
tensor at its module's planned precision.

The merged bf16 model is written as a BF16 GGUF (`gguf_write`), then llama.cpp's own quantizer
(`llama_model_quantize` through llama-cpp-python) converts it, with one per-tensor override for every
decoder tensor: bits 8 -> Q8_0, 4 -> Q4_K, 3 -> Q3_K, 2 -> Q2_K, 16 -> BF16. Tensors the plan does
not cover (token embeddings, output head) follow llama.cpp's defaults for the base type, the
K_M mix of the plan's most common bit-width. Where a K-quant does not fit a tensor's row length (a
multiple of 256), llama.cpp falls back to a 32-block type; `planned_type` mirrors that table and the
built file is read back to check every tensor got it.

After the build the file is run in llama.cpp on a fixed text, and the manifest records how far its
logits are from the merged model's.
"""

import logging
from collections import Counter
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qra.errors import QraError
from qra.plans.memory import SettingsFor
from qra.plans.spec import ModelSpec
from qra.runtime.package.context import Workspace
from qra.runtime.package.gguf_write import Written, architecture_of, check_model_type, write_bf16_gguf
from qra.runtime.package.merged import merged_folder

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
MODEL_FILE = "model.gguf"
MODELFILE = "Modelfile"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog, then returns the value of the function."
TYPE_OF_BITS = {16: Q.BF16, 8: Q.Q8_0, 4: Q.Q4_K, 3: Q.Q3_K, 2: Q.Q2_K}
# llama.cpp's file types whose defaults the uncovered tensors (embeddings, output head) follow
BASE_FILE_TYPE = {8: "MOSTLY_Q8_0", 4: "MOSTLY_Q4_K_M", 3: "MOSTLY_Q3_K_M", 2: "MOSTLY_Q2_K"}
# llama.cpp's fallback for a K-quant whose row length is not a multiple of 256 (tensor_type_fallback)
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

HOW_TO_LOAD = f"""llama.cpp:

```bash
llama-cli -m path/to/gguf/{MODEL_FILE} -p "Hello"
```

llama-cpp-python:

```python
from llama_cpp import Llama

llm = Llama(model_path="path/to/gguf/{MODEL_FILE}")
print(llm("Hello", max_tokens=32)["choices"][0]["text"])
```

Ollama, with the `Modelfile` in this folder (`FROM ./{MODEL_FILE}`; the chat template comes from the file):

```bash
ollama create my-model -f path/to/gguf/Modelfile && ollama run my-model
```

The tokenizer and chat template are in the file; each tensor's type is in `manifest.json`."""


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise QraError(
            "the gguf format needs llama-cpp-python: install it with "
            "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" "
            "pip install -c constraints.txt llama-cpp-python (it builds llama.cpp, a few minutes)"
        ) from None
    return llama_cpp


def check(spec: ModelSpec, config: PretrainedConfig | None = None) -> None:
    """What is checked before anything is written: llama-cpp-python is there and llama.cpp knows the model
    (its family; with its config, its rotary embeddings too)."""
    _llama_cpp()
    check_model_type(spec.model_type)
    if config is not None:
        architecture_of(config)


def planned_type(bits: int, row_length: int) -> Q:
    """The GGUF type of a tensor planned at `bits` with rows of `row_length` weights, after llama.cpp's fallback."""
    wanted = TYPE_OF_BITS[bits]
    if row_length % gguf.GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted
    fallback = FALLBACK.get(wanted, wanted)
    return fallback if row_length % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16


def planned_types(spec: ModelSpec, settings_for: SettingsFor, written: Written) -> dict[str, tuple[int, Q]]:
    """Each decoder tensor's GGUF name -> (planned bits, GGUF type)."""
    planned = {}
    for index, layer in enumerate(spec.layers):
        for module in layer:
            name = written.tensor_names[f"{spec.module_path(index, module)}.weight"]
            bits = settings_for(index, module).bits
            planned[name] = (bits, planned_type(bits, module.in_features))
    return planned


def base_bits(spec: ModelSpec, settings_for: SettingsFor) -> int | None:
    """The quantized bit-width holding the most decoder weights; None when every module stays 16-bit."""
    weights = Counter()
    for index, layer in enumerate(spec.layers):
        for module in layer:
            bits = settings_for(index, module).bits
            if bits < 16:
                weights[bits] += module.in_features * module.out_features
    return max(weights, key=weights.__getitem__) if weights else None


def quantize(source: Path, target: Path, file_type: str, overrides: Mapping[str, Q] | None = None, pure: bool = False) -> None:
    """llama.cpp's quantizer: `file_type` (e.g. "MOSTLY_Q4_K_M") decides each tensor's type by llama.cpp's own
    recipe (every tensor the same when `pure`), except the tensors named in `overrides`, which get theirs."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{file_type}")
    params.pure = pure
    overrides = overrides or {}
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    patterns = [f"^{name.replace('.', '[.]')}$".encode() for name in overrides]  # kept alive until the call returns
    for slot, (pattern, qtype) in enumerate(zip(patterns, overrides.values(), strict=True)):
        table[slot].pattern = pattern
        table[slot].type = int(qtype)
    table[len(overrides)].pattern = None
    table[len(overrides)].type = llama_cpp.GGML_TYPE_COUNT
    params.tt_overrides = table
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise QraError(f"llama.cpp could not quantize {source.name} (status {status}); its log above says why")


def tensor_types(path: Path) -> dict[str, Q]:
    """Every tensor of a GGUF file and its type, as the file says."""
    return {tensor.name: Q(tensor.tensor_type) for tensor in gguf.GGUFReader(str(path)).tensors}


def bits_per_weight(path: Path) -> float:
    """Bits of tensor data per weight over every tensor in the file (llama.cpp's BPW)."""
    tensors = gguf.GGUFReader(str(path)).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` ([len(ids), vocab]), CPU only."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, n_gpu_layers=0, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def model_logits(model: PreTrainedModel, ids: list[int]) -> np.ndarray:
    """A torch model's logits, as fp32, for every position of `ids`."""
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def agreement(gguf_logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close llama.cpp's logits are to the merged model's: largest absolute difference, the same
    relative to the reference's spread, and the share of positions whose top token agrees."""
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


def build(work: Workspace, folder: Path) -> dict[str, Any]:
    """Write the plan-typed GGUF into `folder`, check every tensor's type, and compare its logits with the
    merged model's (computed in bf16 by the model loaded once for writing: no fp32 copy of a 7B model)."""
    ctx = work.ctx
    source = merged_folder(work)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    written = write_bf16_gguf(model, ctx.tokenizer, source, work.scratch / "model-bf16.gguf", f"{ctx.plan.model.id} (qra)",
                              ctx.source_gguf)
    ids = ctx.tokenizer(CHECK_TEXT).input_ids
    reference = model_logits(model, ids)
    del model
    planned = planned_types(ctx.spec, ctx.settings_for, written)
    base = base_bits(ctx.spec, ctx.settings_for)
    target = folder / MODEL_FILE
    if base is None:
        written.path.replace(target)
    else:
        quantize(written.path, target, BASE_FILE_TYPE[base], {name: qtype for name, (_, qtype) in planned.items()})
    types = tensor_types(target)
    wrong = {name: (types.get(name), qtype) for name, (_, qtype) in planned.items() if types.get(name) != qtype}
    if wrong:
        raise QraError(f"llama.cpp gave {len(wrong)} tensors another type than planned, e.g. {next(iter(wrong.items()))}")
    (folder / MODELFILE).write_text(f"FROM ./{MODEL_FILE}\n", encoding="utf-8")
    check_result = agreement(llama_cpp_logits(target, ids), reference)
    logger.info("gguf logits differ from the merged model's by at most %.3g (top-1 agreement %.0f%%)",
                check_result["max_abs_logit_difference"], 100 * check_result["top1_agreement"])
    fallbacks = sum(TYPE_OF_BITS[bits] != qtype for bits, qtype in planned.values())
    return {
        "gguf": {
            "file": MODEL_FILE,
            "architecture": written.architecture,
            "base_file_type": "MOSTLY_BF16" if base is None else BASE_FILE_TYPE[base],
            "pre_tokenizer": written.pre_tokenizer,
            "bits_per_weight": bits_per_weight(target),
            "file_bytes": target.stat().st_size,
            "fallbacks": fallbacks,
            "tensor_types": {name: qtype.name for name, qtype in types.items()},
            "planned_bits": {name: bits for name, (bits, _) in planned.items()},
            "check_text": CHECK_TEXT,
            **check_result,
        }
    }

