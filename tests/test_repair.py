"""The repair operator: whatever it is given, it returns a configuration within budget that is locally
minimal in lost importance (no single one-step upgrade that gains importance still fits)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qra.compiler.importance import Importance
from qra.compiler.repair import _apply, _moves, repair
from qra.compiler.space import Gene, build_space
from qra.errors import QraError
from qra.plans.schema import Device, Training
from qra.testing import tiny_spec

SPACE = build_space(
    tiny_spec("llama", layers=4), bits=(2, 3, 4, 8, 16), ranks=(4, 8, 16, 32),
    training=Training(seq_len=32, batch_size=1), device=Device(kind="cpu", context_bytes=0),
)
LOW, HIGH = SPACE.cost(SPACE.smallest()), SPACE.cost(SPACE.largest())


def importance_from(draws: list[float]) -> Importance:
    """Random but well-formed priors: damage falls with bits, gain rises with rank."""
    sensitivity, plasticity = [], []
    for unit in range(len(SPACE.units)):
        d = draws[unit * 2 : unit * 2 + 2]
        sensitivity.append({b: d[0] * (16 - b) ** 2 for b in SPACE.bits})
        plasticity.append({r: d[1] * r ** 0.5 for r in SPACE.ranks})
    return Importance(tuple(sensitivity), tuple(plasticity))


genes = st.tuples(st.sampled_from(SPACE.bits), st.sampled_from(SPACE.ranks)).map(lambda t: Gene(*t))
configs = st.tuples(*[genes] * len(SPACE.units))
weights = st.lists(st.floats(min_value=0.001, max_value=10.0), min_size=8, max_size=8)
budgets = st.integers(min_value=LOW, max_value=HIGH)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(config=configs, draws=weights, budget=budgets)
def test_repaired_configuration_fits_the_budget_and_no_upgrade_that_helps_still_fits(config, draws, budget):
    importance = importance_from(draws)
    repaired = repair(SPACE, importance, config, budget)
    assert SPACE.cost(repaired) <= budget
    for move in _moves(SPACE, importance, repaired, +1):
        if move.importance_delta < 0:
            assert SPACE.cost(_apply(repaired, move)) > budget


@settings(max_examples=20, deadline=None, derandomize=True)
@given(config=configs, draws=weights)
def test_a_configuration_that_fits_is_left_alone_without_fill(config, draws):
    budget = SPACE.cost(config)
    assert repair(SPACE, importance_from(draws), config, budget, fill=False) == config


def test_downgrade_takes_the_least_important_unit_first():
    importance = importance_from([1.0, 0.0] * 4)
    sensitive = list(importance.sensitivity)
    sensitive[2] = {b: 100.0 * (16 - b) ** 2 for b in SPACE.bits}
    importance = Importance(tuple(sensitive), importance.plasticity)
    start = SPACE.uniform(16, 4)
    one_step = SPACE.cost(start) - 1
    repaired = repair(SPACE, importance, start, one_step, fill=False)
    assert repaired[2] == Gene(16, 4)
    assert sum(gene != Gene(16, 4) for gene in repaired) == 1


def test_a_budget_below_the_smallest_configuration_is_refused():
    with pytest.raises(QraError, match="smallest"):
        repair(SPACE, importance_from([1.0] * 8), SPACE.largest(), LOW - 1)
