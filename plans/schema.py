"""The plan: the contract between the compiler (which writes it) and the runtime (which materializes it).

Every field is typed and validated strictly (unknown fields are errors), so a hand-edited plan that
says `bits: 5` fails with the field's path, not deep inside quantization.
"""

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION = 1
QUANTIZED_BITS = (2, 3, 4, 8)
ALLOWED_BITS = (*QUANTIZED_BITS, 16)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)

Bits = Literal[2, 3, 4, 8, 16]
GroupSize = Literal[-1, 16, 32, 64, 128, 256, 512, 1024]
DType = Literal["bfloat16", "float16", "float32"]
# where each LoRA adapter starts: B = 0 (QLoRA), or the rank-r correction of the module's quantization error in
# weight space (LoftQ) or on its calibration inputs' outputs (CLoQ); see qra.runtime.lora_init
LoraInit = Literal["zeros", "residual", "calibrated"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OmitsNewDefaults(_Strict):
    """A model whose fields named in `_omitted_at_default` are not written while they hold their default, so
    a plan that does not use them dumps (YAML, digests, journal keys) exactly as plans without the field did."""

    _omitted_at_default: tuple[str, ...] = ("lora_init",)

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict:
        data = handler(self)
        for name in self._omitted_at_default:
            if name in data and getattr(self, name) == type(self).model_fields[name].default:
                del data[name]
        return data


class ModelRef(_Strict):
    """Which model the plan was compiled for, and the fingerprint that proves it."""

    id: str = Field(min_length=1)
    architecture: str
    num_layers: PositiveInt
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    content_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class Budget(_Strict):
    bytes: PositiveInt
    text: str


class Training(_OmitsNewDefaults):
    """Settings that enter the memory model (shapes, dtypes, checkpointing) and the fine-tune itself."""

    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 4
    grad_accumulation: PositiveInt = 1
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw"] = "adamw"
    compute_dtype: DType = "bfloat16"
    adapter_dtype: DType = "float32"
    attention: Literal["sdpa", "eager"] = "sdpa"
    padded_batches: bool = Field(
        default=False,
        description="some batch of the data holds sequences of different lengths, so it is padded and attention "
        "runs with a mask (which saves more for backward); set from the data by `qra compile` and `--data`",
    )
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    dequantize_in_backward: bool = Field(
        default=True,
        description="quantized linears keep only their packed weights and dequantize again in backward "
        "(false: the dequantized 16-bit weight is kept for backward, as gptqmodel's TORCH layers do)",
    )
    steps: PositiveInt = 100
    learning_rate: PositiveFloat = 2e-4
    max_grad_norm: PositiveFloat | None = Field(
        default=1.0,
        description="each optimizer step's gradient is clipped to this global L2 norm (None: not clipped), as "
        "transformers' Trainer does by default; without it a batch of a few short answers takes a full step",
    )
    seed: NonNegativeInt = 0
    lora_init: LoraInit = Field(
        default="zeros",
        description="where every adapter starts unless its layer or module says otherwise: zeros (B = 0), "
        "residual (LoftQ) or calibrated (CLoQ)",
    )


class Device(_Strict):
    """The device the plan targets, and its fixed terms that no tensor accounts for (explicit, so that a
    user can set them for their card). The kind matters beyond overhead: dropout masks are bool on CUDA
    but take the input's dtype on CPU."""

    kind: Literal["cuda", "cpu"] = "cuda"
    context_bytes: NonNegativeInt = 500 * 10**6
    allocator_slack: float = Field(default=0.05, ge=0.0, le=1.0)


class ModuleOverride(_OmitsNewDefaults):
    """Per-module settings where the search works per module; unset fields inherit from the layer."""

    bits: Bits | None = None
    group_size: GroupSize | None = None
    rank: PositiveInt | None = None
    alpha: PositiveFloat | None = None
    lora_init: LoraInit | None = None


class LayerPlan(_OmitsNewDefaults):
    index: NonNegativeInt
    bits: Bits
    group_size: GroupSize = 128
    rank: PositiveInt
    alpha: PositiveFloat
    lora_init: LoraInit | None = Field(default=None, description="this layer's adapter init (None: the plan's)")
    modules: dict[str, ModuleOverride] = Field(default_factory=dict)


class ModuleSettings(_Strict):
    """What one linear module gets: resolved from its override, its layer and the plan's training settings."""

    bits: Bits
    group_size: GroupSize
    rank: PositiveInt
    alpha: PositiveFloat
    lora_init: LoraInit = "zeros"


class MemoryEstimateRecord(_Strict):
    components: dict[str, NonNegativeInt]
    total_bytes: NonNegativeInt
    headroom_bytes: int


class Prediction(_Strict):
    score: float | None = None
    metric: str = "held-out loss"
    fidelity: str | None = None


class SeedScores(_Strict):
    """One configuration of the compile's final paired comparison: its held-out loss per seed and, for a
    finalist, its mean difference from the uniform configuration's, paired by seed, with the standard error."""

    name: str
    config: str
    scores: dict[int, float]
    paired_difference: float | None = None
    paired_se: float | None = None


class Provenance(_Strict):
    strategy: str = "manual"
    seed: int | None = None
    evaluations: dict[str, NonNegativeInt] = Field(default_factory=dict)
    wall_time_s: float | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    baselines: dict[str, float] = Field(default_factory=dict)
    created: str | None = None
    note: str | None = None
    finalists: list[SeedScores] = Field(default_factory=list)
    truncated_at_step: PositiveInt | None = Field(
        default=None, description="the search scored candidates at this step of the plan's schedule, not its last"
    )


class Plan(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: ModelRef
    budget: Budget
    training: Training = Field(default_factory=Training)
    device: Device = Field(default_factory=Device)
    layers: list[LayerPlan] = Field(min_length=1)
    memory: MemoryEstimateRecord | None = None
    predicted: Prediction = Field(default_factory=Prediction)
    provenance: Provenance = Field(default_factory=Provenance)

    @model_validator(mode="after")
    def _layers_are_numbered_in_order(self) -> "Plan":
        for position, layer in enumerate(self.layers):
            if layer.index != position:
                raise ValueError(f"layers[{position}].index is {layer.index}; layers must be listed 0, 1, 2, ... in order")
        if len(self.layers) != self.model.num_layers:
            raise ValueError(f"the plan lists {len(self.layers)} layers but model.num_layers is {self.model.num_layers}")
        return self

    def module_settings(self, layer: int, module: str) -> ModuleSettings:
        """Settings of `module` (relative name such as `mlp.down_proj`) in `layer`; overrides match the
        full relative name or its last part (`down_proj`)."""
        plan = self.layers[layer]
        override = plan.modules.get(module) or plan.modules.get(module.rsplit(".", 1)[-1]) or ModuleOverride()
        return ModuleSettings(
            bits=override.bits if override.bits is not None else plan.bits,
            group_size=override.group_size if override.group_size is not None else plan.group_size,
            rank=override.rank if override.rank is not None else plan.rank,
            alpha=override.alpha if override.alpha is not None else plan.alpha,
            lora_init=override.lora_init or plan.lora_init or self.training.lora_init,
        )
