"""What the packagers read: the trained run's artifacts, its plan, and what manifests should record."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from qra.plans.io import dump_plan
from qra.plans.memory import SettingsFor, plan_settings
from qra.plans.schema import Plan
from qra.plans.spec import ModelSpec
from qra.runtime.heldout import HeldOut
from qra.runtime.package.serving import Sums


@dataclass(frozen=True)
class PackageContext:
    """Inputs of packaging.

    `quantized` is the gptqmodel checkpoint the adapter was trained on, `adapter` the folder peft's
    `save_pretrained` wrote. `calibration` (token id lists) is needed only by the `gptq` format, which
    re-quantizes the merged model. `extra_manifest` (measured memory, evaluation results, ...) is
    recorded under `results` in every manifest. `source_gguf` is the model's own GGUF file when it came as
    one: the `gguf` format copies its tokenizer from there. `gguf_mix` asks the `gguf` format for one merged,
    re-quantized file instead of the exact base and adapter.

    Given `held_out` (the run's held-out batches) and `trained_sums` (the trained model's per-sequence sums on
    them), every format measures its held-out loss in its own runtime against the trained model's.
    """

    quantized: Path
    adapter: Path
    tokenizer: PreTrainedTokenizerBase
    plan: Plan
    spec: ModelSpec
    calibration: list[list[int]] = field(default_factory=list)
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    source_gguf: Path | None = None
    gguf_mix: str | None = None
    held_out: HeldOut | None = None
    trained_sums: Sums | None = None

    @property
    def settings_for(self) -> SettingsFor:
        """Each module's planned bits, group size, rank and alpha."""
        return plan_settings(self.plan)

    @property
    def plan_yaml(self) -> str:
        """The plan as the YAML text `qra.plans.io.load_plan` reads back."""
        return dump_plan(self.plan)


@dataclass
class Workspace:
    """One packaging run: its context, a scratch folder, and the merged model once something built it."""

    ctx: PackageContext
    scratch: Path
    merged: Path | None = None
