"""The lossy `--gguf-mix` options of the `gguf` format: the merged model re-quantized into one GGUF file by
llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python).

`plan`: each decoder tensor at its module's planned precision, bits 8 -> Q8_0, 4 -> Q4_K, 3 -> Q3_K,
2 -> Q2_K, 16 -> BF16; tensors the plan does not cover (token embeddings, output head) follow llama.cpp's
defaults for the base type, the K_M mix of the plan's most common bit-width. Where a K-quant does not fit a
tensor's row length (a multiple of 256), llama.cpp falls back to a 32-block type; `planned_type` mirrors that
table and the built file is read back to check every tensor got it. Any other name is one of llama.cpp's
own recipes (`q4_k_m`, `q8_0`, ...: its LLAMA_FTYPE_MOSTLY_* file types).

Re-quantizing the merged weights loses what the exact format keeps; the manifest records by how much.
"""

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import gguf

from qra.errors import QraError
from qra.plans.memory import SettingsFor
from qra.plans.spec import ModelSpec
from qra.runtime.package.gguf_write import Written

Q = gguf.GGMLQuantizationType
PLAN_MIX = "plan"
TYPE_OF_BITS = {16: Q.BF16, 8: Q.Q8_0, 4: Q.Q4_K, 3: Q.Q3_K, 2: Q.Q2_K}
# llama.cpp's file types whose defaults the uncovered tensors (embeddings, output head) follow
BASE_FILE_TYPE = {8: "MOSTLY_Q8_0", 4: "MOSTLY_Q4_K_M", 3: "MOSTLY_Q3_K_M", 2: "MOSTLY_Q2_K"}
# llama.cpp's fallback for a K-quant whose row length is not a multiple of 256 (tensor_type_fallback)
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def llama_cpp():
    """llama-cpp-python, or a QraError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise QraError(
            "the gguf format needs llama-cpp-python: install it with "
            "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" "
            "pip install -c constraints.txt llama-cpp-python (it builds llama.cpp, a few minutes)"
        ) from None
    return llama_cpp


def file_type_of(mix: str) -> str:
    """llama.cpp's file type (e.g. "MOSTLY_Q4_K_M") for a recipe name (e.g. "q4_k_m"), or a QraError."""
    name = f"MOSTLY_{mix.upper()}"
    if not hasattr(llama_cpp(), f"LLAMA_FTYPE_{name}"):
        raise QraError(f"unknown --gguf-mix {mix!r}: give {PLAN_MIX!r} or one of llama.cpp's types, e.g. q4_k_m, q5_k_m, q8_0")
    return name


def check_mix(mix: str) -> None:
    """A QraError, before anything is built, for a mix llama.cpp does not know."""
    if mix != PLAN_MIX:
        file_type_of(mix)


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
    llama_cpp_module = llama_cpp()
    params = llama_cpp_module.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp_module, f"LLAMA_FTYPE_{file_type}")
    params.pure = pure
    overrides = overrides or {}
    table = (llama_cpp_module.llama_model_tensor_override * (len(overrides) + 1))()
    patterns = [f"^{name.replace('.', '[.]')}$".encode() for name in overrides]  # kept alive until the call returns
    for slot, (pattern, qtype) in enumerate(zip(patterns, overrides.values(), strict=True)):
        table[slot].pattern = pattern
        table[slot].type = int(qtype)
    table[len(overrides)].pattern = None
    table[len(overrides)].type = llama_cpp_module.GGML_TYPE_COUNT
    params.tt_overrides = table
    status = llama_cpp_module.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise QraError(f"llama.cpp could not quantize {source.name} (status {status}); its log above says why")


def write_mix(bf16: Written, target: Path, mix: str, spec: ModelSpec, settings_for: SettingsFor) -> dict:
    """Quantize the merged model's BF16 GGUF into `target` by `mix`; a plan mix is checked tensor by tensor.
    Returns what the manifest records of the mix."""
    if mix != PLAN_MIX:
        quantize(bf16.path, target, file_type_of(mix))
        return {"mix": mix, "base_file_type": file_type_of(mix)}
    planned = planned_types(spec, settings_for, bf16)
    base = base_bits(spec, settings_for)
    if base is None:
        bf16.path.replace(target)
    else:
        quantize(bf16.path, target, BASE_FILE_TYPE[base], {name: qtype for name, (_, qtype) in planned.items()})
    types = {tensor.name: Q(tensor.tensor_type) for tensor in gguf.GGUFReader(str(target)).tensors}
    wrong = {name: (types.get(name), qtype) for name, (_, qtype) in planned.items() if types.get(name) != qtype}
    if wrong:
        raise QraError(f"llama.cpp gave {len(wrong)} tensors another type than planned, e.g. {next(iter(wrong.items()))}")
    return {
        "mix": mix,
        "base_file_type": "MOSTLY_BF16" if base is None else BASE_FILE_TYPE[base],
        "fallbacks": sum(TYPE_OF_BITS[bits] != qtype for bits, qtype in planned.values()),
        "planned_bits": {name: bits for name, (bits, _) in planned.items()},
    }
