"""Write a Hugging Face causal LM as a GGUF file that llama.cpp loads.

Tensors come as floats (matrices written in BF16, vectors in F32) or as rows already encoded in GGML blocks
(`Encoded`, the exact transcoding of GPTQ's integers). The `gguf` package writes the file; this module
decides what goes in it. llama.cpp's own converter
(convert_hf_to_gguf.py) is not installed by any package, so the few things it does for the decoder
families qra plans are done here: tensor names through gguf's `TensorNameMap`, llama's rotary
permutation of q/k rows, the hyperparameters llama.cpp reads, and the tokenizer.

The tokenizer is copied key for key from the source model's GGUF when the model came as one (the
default SmolLM2 does), so llama.cpp tokenizes exactly as the source did. From a Hugging Face tokenizer
only byte-level BPE ("gpt2" in llama.cpp) is written; its pre-tokenizer is recorded as "default". Rotary
embeddings: plain, or Llama 3.1's scaling (written as llama.cpp's `rope_freqs` factors); other scalings are refused.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qra.errors import QraError

logger = logging.getLogger(__name__)

# Hugging Face model_type -> llama.cpp architecture, for the decoders whose layout qra's plans know.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
# Architectures whose q/k rows llama.cpp expects in interleaved rotary order (convert_hf_to_gguf's `undo_permute`).
_PERMUTED = {gguf.MODEL_ARCH.LLAMA}
# Keys never copied from a source GGUF: they describe the source file, not the model.
_SOURCE_FILE_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.name"}


@dataclass(frozen=True)
class Written:
    """The BF16 file and what the quantizer and the manifest need to know of it."""

    path: Path
    architecture: str
    tensor_names: dict[str, str]  # Hugging Face parameter name -> GGUF tensor name
    pre_tokenizer: str


def check_model_type(model_type: str) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a Hugging Face model type, or a QraError naming the ones that can be exported."""
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise QraError(
            f"the gguf format does not support model type {model_type!r} (it supports {known}); "
            "package another format (adapter, merged, gptq, onnx)"
        )
    return ARCHITECTURES[model_type]


def architecture_of(config: PretrainedConfig) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for `config` (its model type and rotary embeddings), or a QraError."""
    arch = check_model_type(config.model_type)
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and arch != gguf.MODEL_ARCH.LLAMA):
        raise QraError(
            f"the gguf format supports plain and Llama 3 rotary embeddings; this model uses {rope_type!r} scaling: "
            "package another format (adapter, merged, gptq, onnx)"
        )
    return arch


def _rope(config: PretrainedConfig) -> dict:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def llama3_rope_factors(config: PretrainedConfig) -> torch.Tensor:
    """Llama 3.1's wavelength-dependent rotary scaling as llama.cpp takes it: one factor per frequency, which
    it divides the frequency by (the `rope_freqs` tensor). High frequencies keep theirs, low ones are divided
    by `factor`, and those between are interpolated smoothly."""
    rope = _rope(config)
    dim = _head_dim(config)
    frequencies = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / frequencies
    smooth = (context / wavelength - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelength < context / high, 1.0, torch.where(wavelength > context / low, factor, factors))
    return factors.float()


def _rope_theta(config: PretrainedConfig) -> float:
    return float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, name: str, file_type: gguf.LlamaFileType) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def permute_rotary(weight: torch.Tensor | np.ndarray, heads: int) -> torch.Tensor | np.ndarray:
    """Rows of q_proj/k_proj from Hugging Face's half-split rotary order to llama.cpp's interleaved pairs,
    head by head (the permutation llama.cpp's converter applies to Llama checkpoints). Only rows move, so it
    serves float weights, a LoRA B, and rows already encoded in GGML blocks alike."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Encoded:
    """A matrix already in GGML blocks: uint8 [rows, bytes per row] of `qtype` (see `ggml_blocks`)."""

    data: np.ndarray
    qtype: gguf.GGMLQuantizationType


Tensor = torch.Tensor | Encoded
"""A tensor to write: floats (matrices go in BF16, vectors in F32), or rows already encoded."""


def rotary_heads(name: str, config: PretrainedConfig, arch: gguf.MODEL_ARCH) -> int | None:
    """How many heads the rows of `name` (a Hugging Face parameter name, or a module path) are laid out in
    for llama.cpp's rotary permutation; None where the rows stay as they are."""
    if arch not in _PERMUTED:
        return None
    if name.removesuffix(".weight").endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if name.removesuffix(".weight").endswith("self_attn.k_proj"):
        return config.num_key_value_heads
    return None


def _converted(name: str, tensor: Tensor, config: PretrainedConfig, arch: gguf.MODEL_ARCH) -> Tensor:
    heads = rotary_heads(name, config, arch)
    if heads is None:
        return tensor
    if isinstance(tensor, Encoded):  # blocks run along a row, so permuting rows permutes whole blocks
        return Encoded(permute_rotary(tensor.data, heads), tensor.qtype)
    return permute_rotary(tensor, heads)


def gguf_names(config: PretrainedConfig, arch: gguf.MODEL_ARCH) -> gguf.TensorNameMap:
    """Hugging Face parameter names -> llama.cpp's tensor names for this model."""
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_name(names: gguf.TensorNameMap, name: str) -> str:
    """llama.cpp's name of the Hugging Face parameter `name`, or a QraError."""
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise QraError(f"the gguf format does not know where tensor {name!r} goes; package another format")
    return found


def _add_tensors(writer: gguf.GGUFWriter, tensors: Mapping[str, Tensor], config: PretrainedConfig,
                 arch: gguf.MODEL_ARCH) -> dict[str, str]:
    """Every tensor under its GGUF name: encoded rows as they are, float matrices in BF16 (exact for a bf16
    model), vectors in F32 as llama.cpp keeps norms. A tied output head is not written; llama.cpp reuses the
    embedding."""
    names = gguf_names(config, arch)
    written = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        target = gguf_name(names, name)
        data = _converted(name, tensor, config, arch)
        if isinstance(data, Encoded):
            writer.add_tensor(target, data.data, raw_dtype=data.qtype)
        elif data.ndim == 1:
            writer.add_tensor(target, data.detach().float().numpy())
        else:
            writer.add_tensor(target, gguf.quants.quantize(data.detach().float().numpy(), gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        written[name] = target
    if _rope(config).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config).numpy())
    return written


def _copy_fields(writer: gguf.GGUFWriter, source: Path) -> str:
    """The tokenizer (and the descriptive `general.*` keys) of a source GGUF, value for value; returns its pre-tokenizer."""
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        copied = key.startswith("tokenizer.") or (key.startswith("general.") and key not in _SOURCE_FILE_KEYS)
        if not copied or not field.types:
            continue
        value = field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    pre = reader.fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else "default"


def _token_list(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp's token types: special tokens CONTROL, other added tokens USER_DEFINED,
    ids past the tokenizer's end (a padded embedding) UNUSED placeholders."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special
                         else gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    return tokens, types


def _add_bpe_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, folder: Path, vocab_size: int) -> str:
    """A byte-level BPE tokenizer from its Hugging Face files (merges, special ids, chat template via
    gguf's `SpecialVocab`); returns the pre-tokenizer written."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or type(backend.decoder).__name__ != "ByteLevel":
        raise QraError("the gguf format writes byte-level BPE tokenizers only, and this model's is another kind; "
                       "give the model as a .gguf file (its tokenizer is copied) or package another format")
    tokens, types = _token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    logger.warning("the gguf file's pre-tokenizer is llama.cpp's 'default' regex, which may split text "
                   "differently from this Hugging Face tokenizer; a model given as .gguf keeps its own")
    return "default"


def write_gguf(tensors: Mapping[str, Tensor], config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
               tokenizer_folder: Path, path: Path, name: str, source_gguf: Path | None = None,
               file_type: gguf.LlamaFileType = gguf.LlamaFileType.MOSTLY_BF16) -> Written:
    """Write `tensors` (Hugging Face parameter names) to `path` with the model's hyperparameters and tokenizer."""
    arch = architecture_of(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _add_hyperparameters(writer, config, name, file_type)
    if source_gguf is not None:
        pre = _copy_fields(writer, source_gguf)
    else:
        pre = _add_bpe_tokenizer(writer, tokenizer, tokenizer_folder, config.vocab_size)
    tensor_names = _add_tensors(writer, tensors, config, arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Written(path, gguf.MODEL_ARCH_NAMES[arch], tensor_names, pre)


def write_bf16_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenizer_folder: Path,
                    path: Path, name: str, source_gguf: Path | None = None) -> Written:
    """Write `model` (weights as they are, bf16) to `path` with its hyperparameters and tokenizer."""
    return write_gguf(model.state_dict(), model.config, tokenizer, tokenizer_folder, path, name, source_gguf)
