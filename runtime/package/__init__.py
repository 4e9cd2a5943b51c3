"""Package a fine-tuned run for serving, one module per format (peft keeps one file per tuner likewise).

- `adapter`: the mixed-bit GPTQ base as trained, the LoRA adapter, and the plan (gptqmodel + peft).
- `merged`: the adapter merged into a dense bf16 model that plain transformers loads.
- `gptq`: the merged model GPTQ-quantized again to the plan's per-module bits (gptqmodel, vLLM).
- `onnx`: the merged model exported to ONNX in fp32, verified against torch in onnxruntime.
- `gguf`: for llama.cpp, the trained GPTQ base transcoded exactly plus a GGUF LoRA adapter; or, with a
  `gguf_mix`, the merged model re-quantized into one file.

Given the held-out set, every format's manifest records its held-out loss in its own runtime against the
trained model's (`serving`).

Each format is built in a temporary folder next to its destination and renamed into place when
complete, with its `manifest.json` and `README.md`; a failed build leaves the destination as it was.
"""

import logging
import tempfile
from pathlib import Path
from types import ModuleType

from transformers import PretrainedConfig

from qra.errors import QraError
from qra.files import atomic_folder
from qra.plans.memory import SettingsFor
from qra.plans.spec import ModelSpec
from qra.runtime.package import adapter, gguf, gptq, merged, onnx
from qra.runtime.package.context import PackageContext, Workspace
from qra.runtime.package.manifest import verify_manifest, write_manifest, write_model_card

__all__ = ["FORMATS", "PackageContext", "check_buildable", "check_formats", "package", "verify_manifest"]

logger = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gptq", "onnx", "gguf")
_BUILDERS: dict[str, ModuleType] = {"adapter": adapter, "merged": merged, "gptq": gptq, "onnx": onnx, "gguf": gguf}


def check_formats(formats: list[str]) -> list[str]:
    """The requested formats in order without repeats; an unknown or missing name is a QraError (exit 2)."""
    if not formats:
        raise QraError(f"no package format given; valid formats are {', '.join(FORMATS)}")
    for name in formats:
        if name not in FORMATS:
            raise QraError(f"unknown package format {name!r}; valid formats are {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def check_buildable(formats: list[str], spec: ModelSpec, config: PretrainedConfig | None = None,
                    settings_for: SettingsFor | None = None, gguf_mix: str | None = None) -> None:
    """A QraError when a format cannot be built for this model and plan here (its builder's `check`, where it
    has one; given the model's config and the plan's settings, the check is complete before any training)."""
    if gguf_mix is not None and "gguf" not in formats:
        raise QraError("--gguf-mix applies to the gguf format; add gguf to --format")
    for name in formats:
        builder_check = getattr(_BUILDERS[name], "check", None)
        if builder_check is not None:
            builder_check(spec, config, settings_for=settings_for, gguf_mix=gguf_mix)


def _checked(formats: list[str], ctx: PackageContext) -> list[str]:
    """`check_formats`, and a request that cannot be built is a QraError before anything is written."""
    formats = check_formats(formats)
    if "gptq" in formats and not ctx.calibration:
        raise QraError("the gptq format re-quantizes the merged model and needs calibration token lists; none were given")
    check_buildable(formats, ctx.spec, settings_for=ctx.settings_for, gguf_mix=ctx.gguf_mix)
    return formats


def _build(name: str, work: Workspace, target: Path) -> Path:
    builder = _BUILDERS[name]
    with atomic_folder(target) as staging:
        details = builder.build(work, staging)
        how_to_load = builder.how_to_load(work.ctx) if hasattr(builder, "how_to_load") else builder.HOW_TO_LOAD
        write_model_card(staging, name, work.ctx, how_to_load)
        write_manifest(staging, name, work.ctx, details)
    logger.info("packaged %s into %s", name, target)
    return target


def package(formats: list[str], ctx: PackageContext, out: Path) -> dict[str, Path]:
    """Build each format into `out/<format>`; returns the folder of each."""
    names = _checked(formats, ctx)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".scratch.", dir=out) as scratch:
        work = Workspace(ctx, Path(scratch))
        return {name: _build(name, work, out / name) for name in names}
