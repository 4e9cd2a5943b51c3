"""Per-unit importance: what a unit loses at each bit-width, and what it gains at each rank.

`sensitivity[u][b]` is the loss increase when unit u alone is quantized to b bits (0 at 16 bits);
`plasticity[u][r]` is the loss decrease a short LoRA probe gains at rank r. Both are measured by
`qra.compiler.priors`; here they are only numbers, used to warm-start the search, to weight its
mutations, and by the repair operator.
"""

from dataclasses import dataclass

from qra.compiler.space import Config, Gene


@dataclass(frozen=True)
class Importance:
    sensitivity: tuple[dict[int, float], ...]
    plasticity: tuple[dict[int, float], ...]

    def lost(self, unit: int, gene: Gene) -> float:
        """Importance a unit gives up under `gene`: its quantization damage minus its adapter's gain."""
        return self.sensitivity[unit].get(gene.bits, 0.0) - self.plasticity[unit].get(gene.rank, 0.0)

    def total_lost(self, config: Config) -> float:
        return sum(self.lost(unit, gene) for unit, gene in enumerate(config))

    def to_dict(self) -> dict:
        return {
            "sensitivity": [{str(k): v for k, v in s.items()} for s in self.sensitivity],
            "plasticity": [{str(k): v for k, v in p.items()} for p in self.plasticity],
        }


def flat_importance(units: int, bits: tuple[int, ...], ranks: tuple[int, ...]) -> Importance:
    """No measured priors: fewer bits and less rank cost the same everywhere (used by ablations)."""
    top_bits, top_rank = max(bits), max(ranks)
    sensitivity = tuple({b: (top_bits - b) / top_bits for b in bits} for _ in range(units))
    plasticity = tuple({r: r / top_rank for r in ranks} for _ in range(units))
    return Importance(sensitivity, plasticity)
