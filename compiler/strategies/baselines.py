"""Deterministic baselines, each one config scored once at the top fidelity, measured in the same
harness as the search (README, "The search": baselines):

- `uniform`: QLoRA-style, one bit-width and one rank for every unit;
- `sequential`: LQ-LoRA-style, bits allocated by quantization sensitivity under the budget at a fixed
  rank, then the largest uniform rank that fits;
- `heuristic`: the first and last layers one bit-width step above the rest;
- `llamacpp`: llama.cpp's K_M mix (what consumer-GPU users already run), at module granularity: attn_v and
  ffn_down one bit-width step up in the layers llama.cpp's `use_more_bits` picks.
"""

from collections.abc import Callable

from qra.compiler.space import Config, Gene
from qra.compiler.strategies.base import Candidate, Problem
from qra.errors import QraError

QLORA_BITS = 4


def _largest_rank(problem: Problem, bits: tuple[int, ...]) -> int | None:
    """The largest uniform rank that fits with these per-unit bits."""
    fitting = [r for r in problem.space.ranks if problem.fits(tuple(Gene(b, r) for b in bits))]
    return fitting[-1] if fitting else None


def uniform_config(problem: Problem, prefer_bits: int | None = QLORA_BITS) -> Config:
    """Uniform bits and rank: `prefer_bits` (QLoRA's 4) if it fits at the smallest rank, else the highest
    bit-width that fits; then the highest rank that fits at that bit-width."""
    space = problem.space
    fitting = [b for b in space.bits if problem.fits(space.uniform(b, space.ranks[0]))]
    if not fitting:
        raise QraError(f"no configuration fits the budget of {problem.budget:,} bytes, not even the smallest "
                       f"({space.cost(space.smallest()):,} bytes)")
    bits = prefer_bits if prefer_bits in fitting else fitting[-1]
    return space.uniform(bits, _largest_rank(problem, (bits,) * problem.units))


def _best_bit_upgrade(problem: Problem, config: Config) -> Config | None:
    """The one-step bit upgrade with the most sensitivity gained per byte that still fits, if any."""
    space, sensitivity = problem.space, problem.importance.sensitivity
    upgrades = []
    for unit, gene in enumerate(config):
        index = space.bits.index(gene.bits)
        if index + 1 < len(space.bits):
            better = Gene(space.bits[index + 1], gene.rank)
            gain = sensitivity[unit].get(gene.bits, 0.0) - sensitivity[unit].get(better.bits, 0.0)
            size = max(space.unit_bytes(unit, better) - space.unit_bytes(unit, gene), 1)
            upgrades.append((-gain / size, unit, better))
    for _, unit, better in sorted(upgrades):
        upgraded = config[:unit] + (better,) + config[unit + 1 :]
        if problem.fits(upgraded):
            return upgraded
    return None


def sequential_config(problem: Problem) -> Config:
    """Bits first, by sensitivity gain per byte (greedy one-step upgrades from the smallest bit-width)
    at the uniform baseline's rank; then the largest uniform rank that fits with those bits."""
    space = problem.space
    rank = uniform_config(problem)[0].rank
    config = space.uniform(space.bits[0], rank)
    while (upgraded := _best_bit_upgrade(problem, config)) is not None:
        config = upgraded
    bits = tuple(gene.bits for gene in config)
    return tuple(Gene(b, _largest_rank(problem, bits)) for b in bits)


def heuristic_config(problem: Problem) -> Config:
    """The uniform baseline with the first and last layers' units one bit-width step up, repaired
    (with flat importance: the heuristic knows nothing of the measured priors)."""
    space = problem.space
    base = uniform_config(problem)
    edges = {0, space.spec.num_layers - 1}
    config = tuple(
        Gene(space.bits[min(space.bits.index(gene.bits) + 1, len(space.bits) - 1)], gene.rank)
        if unit.layer in edges else gene
        for unit, gene in zip(space.units, base)
    )
    return problem.flat().repair(config)


LLAMACPP_MODULES = ("v_proj", "down_proj")  # llama.cpp's attn_v and ffn_down


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule (`use_more_bits` in its src/llama-quant.cpp, integer division as in C++) for the
    layers whose attn_v and ffn_down a K_M mix quantizes at a higher type."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def llamacpp_config(problem: Problem) -> Config:
    """llama.cpp's K_M mix: v_proj and down_proj one bit-width step up in the `use_more_bits` layers, every
    other module at the base bits, the base the largest bit-width for which the mix fits at some uniform
    rank, and the rank the largest that then fits."""
    space = problem.space
    if space.granularity != "module":
        raise QraError("the llamacpp baseline sets bits per module: use --granularity module")
    layers = space.spec.num_layers
    for base in reversed(space.bits):
        up = space.bits[min(space.bits.index(base) + 1, len(space.bits) - 1)]
        bits = tuple(
            up if unit.modules[0].short_name in LLAMACPP_MODULES and use_more_bits(unit.layer, layers) else base
            for unit in space.units
        )
        rank = _largest_rank(problem, bits)
        if rank is not None:
            return tuple(Gene(b, rank) for b in bits)
    raise QraError(f"no llama.cpp-style mix fits the budget of {problem.budget:,} bytes")


BASELINES: dict[str, Callable[[Problem], Config]] = {
    "uniform": uniform_config,
    "sequential": sequential_config,
    "heuristic": heuristic_config,
    "llamacpp": llamacpp_config,
}


class Baseline:
    """A baseline as a strategy: asks for its one config at the top fidelity, once."""

    def __init__(self, problem: Problem, name: str) -> None:
        if name not in BASELINES:
            raise QraError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        self.problem = problem
        self.name = name

    def start(self, budget_evaluations: int) -> None:
        self._asked = False

    def ask(self) -> list[Candidate]:
        if self._asked:
            return []
        self._asked = True
        return [Candidate(BASELINES[self.name](self.problem), self.problem.top, f"baseline:{self.name}")]

    def tell(self, candidate: Candidate, score: float) -> None:
        """A baseline does not adapt to scores."""
