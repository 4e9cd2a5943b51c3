"""The search space: one gene per unit, each gene a (bits, rank) pair.

A unit is a decoder layer (granularity `layer`) or one linear module of a layer (granularity
`module`). A configuration assigns a gene to every unit; its cost is the memory model's estimate of
the peak footprint of fine-tuning under it, the quantity the budget bounds.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from qra.plans.memory import (
    DTYPE_BYTES,
    SettingsFor,
    estimate_memory,
    linear_weight_bytes,
    lora_parameter_count,
)
from qra.plans.schema import Device, LayerPlan, ModuleOverride, ModuleSettings, Training
from qra.plans.spec import LinearSpec, ModelSpec

Granularity = Literal["layer", "module"]
FP32 = 4


@dataclass(frozen=True, order=True)
class Gene:
    bits: int
    rank: int


Config = tuple[Gene, ...]


@dataclass(frozen=True)
class Unit:
    """What one gene decides: a layer's modules, or one module."""

    layer: int
    modules: tuple[LinearSpec, ...]

    @property
    def label(self) -> str:
        if len(self.modules) == 1:
            return f"{self.layer}.{self.modules[0].short_name}"
        return str(self.layer)


def config_key(config: Config) -> str:
    """A stable text form of a configuration (journal records and deduplication use it)."""
    return ",".join(f"{gene.bits}:{gene.rank}" for gene in config)


def parse_config_key(key: str) -> Config:
    return tuple(Gene(int(bits), int(rank)) for bits, rank in (item.split(":") for item in key.split(",")))


@dataclass(frozen=True)
class SearchSpace:
    spec: ModelSpec
    units: tuple[Unit, ...]
    bits: tuple[int, ...]
    ranks: tuple[int, ...]
    training: Training
    device: Device
    group_size: int = 128
    granularity: Granularity = "layer"

    def settings_for(self, config: Config) -> SettingsFor:
        """The memory model's and the runtime's view of a configuration: settings per module."""
        by_module: dict[tuple[int, str], ModuleSettings] = {}
        for unit, gene in zip(self.units, config):
            settings = ModuleSettings(bits=gene.bits, group_size=self.group_size, rank=gene.rank, alpha=2.0 * gene.rank,
                                      lora_init=self.training.lora_init)
            for module in unit.modules:
                by_module[(unit.layer, module.name)] = settings
        return lambda layer, module: by_module[(layer, module.name)]

    def cost(self, config: Config) -> int:
        """Peak bytes by the memory model (every term, transients and overhead included)."""
        return estimate_memory(self.spec, self.settings_for(config), self.training, self.device).total_bytes

    def unit_bytes(self, index: int, gene: Gene) -> int:
        """The part of the cost that one unit's gene decides on its own: base weights, LoRA
        parameters, gradients and AdamW moments, and the adapters' rank-sized saved activations.
        Differences of it between genes are exact differences of the additive terms of `cost`."""
        e = DTYPE_BYTES[self.training.compute_dtype]
        a = DTYPE_BYTES[self.training.adapter_dtype]
        tokens = self.training.batch_size * self.training.seq_len
        settings = ModuleSettings(bits=gene.bits, group_size=self.group_size, rank=gene.rank, alpha=2.0 * gene.rank)
        total = 0
        for module in self.units[index].modules:
            total += linear_weight_bytes(module, settings, e)
            total += 4 * lora_parameter_count(module, gene.rank) * a
            if not self.training.gradient_checkpointing:
                total += tokens * gene.rank * a
                if gene.bits != 16 and not self.training.dequantize_in_backward:
                    total += module.in_features * module.out_features * e
        return total

    def uniform(self, bits: int, rank: int) -> Config:
        return tuple(Gene(bits, rank) for _ in self.units)

    def smallest(self) -> Config:
        return self.uniform(self.bits[0], self.ranks[0])

    def largest(self) -> Config:
        return self.uniform(self.bits[-1], self.ranks[-1])

    def layer_plans(self, config: Config) -> list[LayerPlan]:
        """The plan's `layers` for a configuration; at module granularity the layer carries its most
        common gene and the other modules are overrides."""
        plans = []
        for layer in range(self.spec.num_layers):
            genes = {unit.modules[0].short_name if len(unit.modules) == 1 else None: gene
                     for unit, gene in zip(self.units, config) if unit.layer == layer}
            if None in genes:
                base = genes[None]
                overrides = {}
            else:
                base = max(genes.values(), key=lambda g: sum(1 for other in genes.values() if other == g))
                overrides = {
                    name: ModuleOverride(bits=gene.bits, rank=gene.rank, alpha=2.0 * gene.rank)
                    for name, gene in genes.items()
                    if gene != base
                }
            plans.append(LayerPlan(index=layer, bits=base.bits, group_size=self.group_size, rank=base.rank,
                                   alpha=2.0 * base.rank, modules=overrides))
        return plans


def build_space(
    spec: ModelSpec,
    bits: Iterable[int],
    ranks: Iterable[int],
    training: Training,
    device: Device,
    granularity: Granularity = "layer",
    group_size: int = 128,
) -> SearchSpace:
    if granularity == "layer":
        units = tuple(Unit(i, tuple(layer)) for i, layer in enumerate(spec.layers))
    else:
        units = tuple(Unit(i, (module,)) for i, layer in enumerate(spec.layers) for module in layer)
    return SearchSpace(
        spec=spec, units=units, bits=tuple(sorted(set(bits))), ranks=tuple(sorted(set(ranks))),
        training=training, device=device, group_size=group_size, granularity=granularity,
    )
