"""Every package folder describes itself: `manifest.json` (files and hashes, plan fingerprint, versions,
results) and a short `README.md` model card (base model, per-layer bits and ranks, budget, loading)."""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from qra.files import content_digest
from qra.plans.schema import LayerPlan, Plan
from qra.runtime.package.context import PackageContext
from qra.units import format_bytes

MANIFEST = "manifest.json"
README = "README.md"
VERSIONED = ("torch", "transformers", "peft", "gptqmodel", "onnx", "onnxruntime", "gguf", "llama_cpp_python", "qra")


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` but the manifest, by relative POSIX path: its sha256 and size."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": content_digest(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST
    }


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that wrote (and will read) a package."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(folder: Path, format_name: str, ctx: PackageContext, details: dict[str, Any]) -> Path:
    """Write `manifest.json`, hashing the folder as it is now: write it after every other file."""
    manifest = {
        "format": format_name,
        "base_model": ctx.plan.model.id,
        "plan_fingerprint": ctx.plan.model.fingerprint,
        "versions": package_versions(),
        **details,
        "results": ctx.extra_manifest,
        "files": file_entries(folder),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def verify_manifest(folder: Path) -> list[str]:
    """What does not match `folder`'s manifest (missing, changed or unlisted files); empty when all do."""
    listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    present = file_entries(folder)
    problems = [f"{name}: missing" for name in listed if name not in present]
    problems += [f"{name}: not in the manifest" for name in present if name not in listed]
    problems += [f"{name}: changed" for name, entry in listed.items() if name in present and present[name] != entry]
    return problems


def _layer_row(layer: LayerPlan) -> str:
    overrides = ", ".join(
        f"{name}: " + " ".join(f"{key}={value}" for key, value in override.model_dump(exclude_none=True).items())
        for name, override in layer.modules.items()
    )
    return f"| {layer.index} | {layer.bits} | {layer.group_size} | {layer.rank} | {layer.alpha:g} | {overrides or '-'} |"


def _plan_section(plan: Plan) -> list[str]:
    lines = [f"Budget: {plan.budget.text} ({format_bytes(plan.budget.bytes)})"]
    if plan.memory is not None:
        lines[0] += f"; the plan's memory estimate is {format_bytes(plan.memory.total_bytes)}"
    return [
        *lines,
        "",
        "| layer | bits | group size | rank | alpha | module overrides |",
        "|---|---|---|---|---|---|",
        *(_layer_row(layer) for layer in plan.layers),
    ]


def write_model_card(folder: Path, format_name: str, ctx: PackageContext, how_to_load: str) -> Path:
    """Write a short `README.md`: what this is, the per-layer plan, how to load it."""
    plan = ctx.plan
    lines = [
        f"# {plan.model.id}: qra `{format_name}` package",
        "",
        f"Fine-tuned from `{plan.model.id}` ({plan.model.architecture}, {plan.model.num_layers} layers) with "
        "per-layer mixed-bit GPTQ and per-layer-rank LoRA, as planned by qra.",
        f"Plan fingerprint: `{plan.model.fingerprint}`.",
        "",
        "## Plan",
        "",
        *_plan_section(plan),
        "",
        "## Loading",
        "",
        how_to_load,
        "",
        f"`{MANIFEST}` lists every file with its sha256, the package versions, and measured results.",
    ]
    path = folder / README
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
