"""A plan's per-layer picture (bits and rank by layer, as a PNG) and the bits/rank pattern in numbers.

The AutoQRA paper reports that its plans give lower-bit layers higher ranks (LoRA compensating for
quantization error); `bits_rank_pattern` says whether a plan shows that, module by module.
"""

from dataclasses import dataclass
from pathlib import Path

from qra.files import atomic_path
from qra.plans.memory import plan_settings
from qra.plans.schema import Plan
from qra.plans.spec import ModelSpec


@dataclass(frozen=True)
class LayerProfile:
    """One layer's settings over its linear modules: parameter-weighted mean bits, mean rank, and ranges."""

    index: int
    bits: float
    bits_range: tuple[int, int]
    rank: float
    rank_range: tuple[int, int]


@dataclass(frozen=True)
class BitsRankPattern:
    """Mean LoRA rank of the modules at each bit-width, over every linear module of the plan."""

    mean_rank_by_bits: dict[int, float]
    modules_by_bits: dict[int, int]

    @property
    def lower_bits_higher_rank(self) -> bool:
        """True when the mean rank never rises with bits and falls at least once (the paper's pattern)."""
        ranks = [self.mean_rank_by_bits[b] for b in sorted(self.mean_rank_by_bits)]
        return len(ranks) > 1 and all(a >= b for a, b in zip(ranks, ranks[1:])) and ranks[0] > ranks[-1]

    def describe(self) -> str:
        means = ", ".join(
            f"{b}-bit: rank {self.mean_rank_by_bits[b]:.1f} ({self.modules_by_bits[b]} modules)" for b in sorted(self.mean_rank_by_bits)
        )
        if len(self.mean_rank_by_bits) < 2:
            verdict = "one bit-width only: no pattern to read"
        elif self.lower_bits_higher_rank:
            verdict = "lower-bit modules get higher ranks"
        else:
            verdict = "lower-bit modules do not get higher ranks"
        return f"mean rank by bits: {means}; {verdict}"


def layer_profiles(plan: Plan, spec: ModelSpec) -> list[LayerProfile]:
    settings_for = plan_settings(plan)
    profiles = []
    for index, layer in enumerate(spec.layers):
        settings = [settings_for(index, module) for module in layer]
        sizes = [module.in_features * module.out_features for module in layer]
        bits = [s.bits for s in settings]
        ranks = [s.rank for s in settings]
        profiles.append(LayerProfile(
            index=index,
            bits=sum(b * n for b, n in zip(bits, sizes)) / sum(sizes),
            bits_range=(min(bits), max(bits)),
            rank=sum(ranks) / len(ranks),
            rank_range=(min(ranks), max(ranks)),
        ))
    return profiles


def bits_rank_pattern(plan: Plan, spec: ModelSpec) -> BitsRankPattern:
    settings_for = plan_settings(plan)
    ranks_by_bits: dict[int, list[int]] = {}
    for index, layer in enumerate(spec.layers):
        for module in layer:
            settings = settings_for(index, module)
            ranks_by_bits.setdefault(settings.bits, []).append(settings.rank)
    return BitsRankPattern(
        mean_rank_by_bits={b: sum(r) / len(r) for b, r in sorted(ranks_by_bits.items())},
        modules_by_bits={b: len(r) for b, r in sorted(ranks_by_bits.items())},
    )


def plot_plan(plan: Plan, spec: ModelSpec, path: Path, title: str | None = None) -> None:
    """Write a two-panel PNG: bits by layer above, LoRA rank by layer below; bars show the parameter-weighted
    mean over the layer's modules, whiskers the range where modules differ. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = layer_profiles(plan, spec)
    layers = [p.index for p in profiles]
    figure, (bits_axis, rank_axis) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.25 * len(layers) + 2), 4.8))
    for axis, values, ranges, colour, label in (
        (bits_axis, [p.bits for p in profiles], [p.bits_range for p in profiles], "tab:blue", "bits"),
        (rank_axis, [p.rank for p in profiles], [p.rank_range for p in profiles], "tab:orange", "LoRA rank"),
    ):
        below = [v - low for v, (low, _) in zip(values, ranges)]
        above = [high - v for v, (_, high) in zip(values, ranges)]
        varies = any(low != high for low, high in ranges)
        axis.bar(layers, values, color=colour, yerr=[below, above] if varies else None, capsize=2)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    bits_axis.set_yticks(sorted({b for p in profiles for b in p.bits_range}))
    rank_axis.set_yticks(sorted({r for p in profiles for r in p.rank_range}))
    rank_axis.set_xlabel("decoder layer")
    pattern = bits_rank_pattern(plan, spec)
    bits_axis.set_title(title or f"{plan.model.id}, budget {plan.budget.text} ({plan.provenance.strategy})", fontsize=10)
    rank_axis.set_title(pattern.describe(), fontsize=7)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path, ".png") as staging:
        figure.savefig(staging, dpi=120)
    plt.close(figure)
