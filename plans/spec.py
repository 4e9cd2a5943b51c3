"""The model spec: what a plan and the memory model need to know about a causal LM, from its config alone.

The model is built on the meta device (no weights, no memory), so any config transformers can build
works: a 7B-8B model's spec takes a second and no download beyond its config.json. `resolve_spec` is the
one way from a `--model` to its spec.
"""

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from qra.errors import QraError
from qra.models import ModelSource, load_config, resolve_model

# Module roles in a llama-style decoder layer: which input each linear reads decides what autograd saves.
ATTENTION_INPUT = "attention_input"  # q, k, v: read the post-norm hidden state
ATTENTION_OUTPUT = "attention_output"  # o: reads the attention output
MLP_INPUT = "mlp_input"  # gate, up: read the post-norm hidden state
MLP_OUTPUT = "mlp_output"  # down: reads act(gate) * up
_ROLE_BY_SUFFIX = {
    "q_proj": ATTENTION_INPUT,
    "k_proj": ATTENTION_INPUT,
    "v_proj": ATTENTION_INPUT,
    "o_proj": ATTENTION_OUTPUT,
    "gate_proj": MLP_INPUT,
    "up_proj": MLP_INPUT,
    "down_proj": MLP_OUTPUT,
}


@dataclass(frozen=True)
class LinearSpec:
    """One linear module of a decoder layer; `name` is relative to the layer (`self_attn.q_proj`)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def role(self) -> str:
        return _ROLE_BY_SUFFIX[self.name.rsplit(".", 1)[-1]]

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor outside the quantizable linears (embeddings, norms, lm_head, buffers)."""

    name: str
    shape: tuple[int, ...]
    floating: bool
    itemsize: int
    buffer: bool = False

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a llama-style causal LM: decoder layers and their linears, and everything else."""

    architecture: str
    model_type: str
    layer_prefix: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    layers: tuple[tuple[LinearSpec, ...], ...]
    other_tensors: tuple[TensorSpec, ...]

    def module_path(self, layer: int, module: LinearSpec) -> str:
        """Full module name inside the transformers model, as peft and gptqmodel address it."""
        return f"{self.layer_prefix}.{layer}.{module.name}"

    @property
    def parameter_count(self) -> int:
        linear = sum(
            m.in_features * m.out_features + (m.out_features if m.bias else 0)
            for layer in self.layers
            for m in layer
        )
        return linear + sum(t.numel for t in self.other_tensors)


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The transformers model for `config` on the meta device: every shape, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise QraError(f"{type(model).__name__} has no list of decoder layers; qra supports llama-style causal LMs")
    return max(lists, key=lambda item: len(item[1]))


def _layer_linears(layer: nn.Module) -> tuple[LinearSpec, ...]:
    return tuple(
        LinearSpec(name=name, in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    )


def _check_supported(architecture: str, layers: tuple[tuple[LinearSpec, ...], ...]) -> None:
    for module in layers[0]:
        if module.short_name not in _ROLE_BY_SUFFIX:
            raise QraError(
                f"{architecture} has a decoder module {module.name!r} that qra's memory model does not know; "
                "supported are llama-style layers (q/k/v/o_proj, gate/up/down_proj: Llama, Qwen2, Mistral)"
            )


def spec_from_config(config: PretrainedConfig) -> ModelSpec:
    """Read a ModelSpec off the meta-device model that `config` describes."""
    model = build_meta_model(config)
    prefix, decoder = _decoder_layers(model)
    layers = tuple(_layer_linears(layer) for layer in decoder)
    architecture = type(model).__name__
    _check_supported(architecture, layers)
    in_layers = {f"{prefix}.{i}.{m.name}.{kind}" for i, layer in enumerate(layers) for m in layer for kind in ("weight", "bias")}
    tensors = [(name, t, False) for name, t in model.named_parameters()] + [(name, t, True) for name, t in model.named_buffers()]
    other = tuple(
        TensorSpec(name=name, shape=tuple(t.shape), floating=t.is_floating_point(), itemsize=t.element_size(), buffer=buffer)
        for name, t, buffer in tensors
        if name not in in_layers
    )
    text_config = config.get_text_config()
    num_heads = text_config.num_attention_heads
    return ModelSpec(
        architecture=architecture,
        model_type=text_config.model_type,
        layer_prefix=prefix,
        num_layers=len(layers),
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
        vocab_size=text_config.vocab_size,
        max_positions=getattr(text_config, "max_position_embeddings", 0) or 0,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layers=layers,
        other_tensors=other,
    )


class ResolvedModel(NamedTuple):
    """A `--model` resolved: where it comes from, its spec, and its transformers config (as read, unmarked by
    building the spec)."""

    source: ModelSource
    spec: ModelSpec
    config: PretrainedConfig


def resolve_spec(model: str, seq_len: int | None = None) -> ResolvedModel:
    """Resolve `model` (`qra.models.resolve_model`), read its config and build its spec (from a copy: building
    the meta model marks the config it is given); a `seq_len` above the model's position limit is a QraError."""
    source = resolve_model(model)
    config = load_config(source)
    spec = spec_from_config(copy.deepcopy(config))
    if seq_len is not None and spec.max_positions and seq_len > spec.max_positions:
        raise QraError(f"seq_len {seq_len} is above the model's limit of {spec.max_positions} positions")
    return ResolvedModel(source, spec, config)
