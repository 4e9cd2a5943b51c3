"""The repair operator: make any configuration fit the budget, then spend what is left.

While over budget, take the one-step downgrade (one unit one bit-width lower, or one rank lower)
that gives up the least importance per byte saved; then, while some one-step upgrade still fits,
take the one that gains the most importance per byte. Byte deltas come from the unit's additive
cost (exact for weights, LoRA state and rank-sized activations); the exact estimate is checked at
the end and the loop resumes if the non-additive terms (maxima, slack) tipped it over.
"""

from dataclasses import dataclass

from qra.compiler.importance import Importance
from qra.compiler.space import Config, Gene, SearchSpace
from qra.errors import QraError


@dataclass(frozen=True)
class Move:
    unit: int
    gene: Gene
    bytes_delta: int
    importance_delta: float


def _neighbours(space: SearchSpace, gene: Gene, direction: int) -> list[Gene]:
    """One step down (direction -1) or up (+1) in bits, and in rank."""
    moves = []
    bits_index, rank_index = space.bits.index(gene.bits), space.ranks.index(gene.rank)
    if 0 <= bits_index + direction < len(space.bits):
        moves.append(Gene(space.bits[bits_index + direction], gene.rank))
    if 0 <= rank_index + direction < len(space.ranks):
        moves.append(Gene(gene.bits, space.ranks[rank_index + direction]))
    return moves


def _moves(space: SearchSpace, importance: Importance, config: Config, direction: int) -> list[Move]:
    moves = []
    for unit, gene in enumerate(config):
        here = space.unit_bytes(unit, gene)
        for other in _neighbours(space, gene, direction):
            delta_bytes = space.unit_bytes(unit, other) - here
            delta_importance = importance.lost(unit, other) - importance.lost(unit, gene)
            moves.append(Move(unit, other, delta_bytes, delta_importance))
    return moves


def _apply(config: Config, move: Move) -> Config:
    return config[: move.unit] + (move.gene,) + config[move.unit + 1 :]


def _downgrade_until_within(space: SearchSpace, importance: Importance, config: Config, budget: int) -> Config:
    cost = space.cost(config)
    while cost > budget:
        moves = [m for m in _moves(space, importance, config, -1) if m.bytes_delta < 0]
        if not moves:
            raise QraError(f"no configuration fits: even the smallest needs {space.cost(space.smallest()):,} bytes, over the budget of {budget:,}")
        # least importance lost per byte saved; ties broken by unit for determinism
        best = min(moves, key=lambda m: (m.importance_delta / -m.bytes_delta, m.unit, m.gene))
        config = _apply(config, best)
        cost = space.cost(config)
    return config


def _fill_slack(space: SearchSpace, importance: Importance, config: Config, budget: int) -> Config:
    while True:
        # every helpful upgrade is tried against the exact estimate, best gain per byte first: the additive
        # byte delta orders them but cannot rule one out (a module leaving the quantized set can shrink
        # the dequantize workspace, so the exact delta may be smaller)
        moves = [m for m in _moves(space, importance, config, +1) if m.importance_delta < 0]
        best = None
        for move in sorted(moves, key=lambda m: (m.importance_delta / max(m.bytes_delta, 1), m.unit, m.gene)):
            candidate = _apply(config, move)
            if space.cost(candidate) <= budget:
                best = candidate
                break
        if best is None:
            return config
        config = best


def repair(space: SearchSpace, importance: Importance, config: Config, budget: int, fill: bool = True) -> Config:
    """A configuration within `budget` (by the exact memory model) near `config`; with `fill`, no
    single one-step upgrade that gains importance still fits."""
    config = _downgrade_until_within(space, importance, config, budget)
    return _fill_slack(space, importance, config, budget) if fill else config
