"""The per-layer picture of a plan (`qra plan show PLAN --plot out.png`) and the bits/rank pattern in numbers."""


import pytest
from typer.testing import CliRunner

from qra.cli import app
from qra.plans.build import uniform_plan
from qra.plans.plot import bits_rank_pattern, layer_profiles, plot_plan
from qra.plans.schema import Budget, LayerPlan, ModelRef, ModuleOverride, Plan
from qra.testing import tiny_config, tiny_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plan_with(layers: list[tuple[int, int]], overrides: dict[int, dict[str, ModuleOverride]] | None = None) -> Plan:
    """A plan for the tiny 4-layer Llama with the given (bits, rank) per layer."""
    spec = tiny_spec()
    ref = ModelRef(id="tiny", architecture=spec.architecture, num_layers=spec.num_layers, fingerprint="f" * 64)
    plan = uniform_plan(spec, ref, Budget(bytes=10**10, text="10GB"), 4, 8)
    return plan.model_copy(update={"layers": [
        LayerPlan(index=i, bits=b, rank=r, alpha=2.0 * r, modules=(overrides or {}).get(i, {})) for i, (b, r) in enumerate(layers)
    ]})


def test_lower_bit_layers_with_higher_ranks_show_the_papers_pattern():
    pattern = bits_rank_pattern(plan_with([(2, 32), (3, 16), (4, 8), (8, 8)]), tiny_spec())
    assert pattern.mean_rank_by_bits == {2: 32, 3: 16, 4: 8, 8: 8}
    assert pattern.lower_bits_higher_rank
    assert "lower-bit modules get higher ranks" in pattern.describe()


def test_higher_bit_layers_with_higher_ranks_do_not():
    pattern = bits_rank_pattern(plan_with([(2, 4), (4, 8), (4, 8), (8, 32)]), tiny_spec())
    assert not pattern.lower_bits_higher_rank
    assert "do not get higher ranks" in pattern.describe()


def test_a_uniform_plan_has_no_pattern_to_read():
    pattern = bits_rank_pattern(plan_with([(4, 8)] * 4), tiny_spec())
    assert not pattern.lower_bits_higher_rank
    assert "no pattern" in pattern.describe()


def test_module_overrides_count_module_by_module_and_weigh_bits_by_parameters():
    spec = tiny_spec()
    down = {0: {"mlp.down_proj": ModuleOverride(bits=8, rank=4)}}
    plan = plan_with([(4, 16)] * 4, down)
    pattern = bits_rank_pattern(plan, spec)
    modules = len(spec.layers[0])
    assert pattern.modules_by_bits == {4: 4 * modules - 1, 8: 1}
    assert pattern.lower_bits_higher_rank
    first = layer_profiles(plan, spec)[0]
    sizes = {m.name: m.in_features * m.out_features for m in spec.layers[0]}
    expected = (8 * sizes["mlp.down_proj"] + 4 * (sum(sizes.values()) - sizes["mlp.down_proj"])) / sum(sizes.values())
    assert first.bits == pytest.approx(expected)
    assert first.bits_range == (4, 8) and first.rank_range == (4, 16)


def test_plot_writes_a_png_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "plan.png"
    plot_plan(plan_with([(2, 32), (3, 16), (4, 8), (8, 8)]), tiny_spec(), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.png"]


def test_plan_show_plot_writes_the_picture_and_states_the_pattern(tmp_path):
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    tiny_config().to_json_file(config)
    runner = CliRunner()
    plan = tmp_path / "plan.yaml"
    assert runner.invoke(app, ["plan", "new", "-o", str(plan), "--budget", "8GB", "--model", str(config)]).exit_code == 0
    result = runner.invoke(app, ["plan", "show", str(plan), "--model", str(config), "--plot", str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.output
    assert "one bit-width only" in result.stdout
    assert (tmp_path / "out.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plan_show_plot_into_a_missing_folder_is_one_line(tmp_path):
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    tiny_config().to_json_file(config)
    runner = CliRunner()
    plan = tmp_path / "plan.yaml"
    runner.invoke(app, ["plan", "new", "-o", str(plan), "--budget", "8GB", "--model", str(config)])
    result = runner.invoke(app, ["plan", "show", str(plan), "--model", str(config), "--plot", str(tmp_path / "no" / "out.png")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: --plot {tmp_path / 'no' / 'out.png'}: folder {tmp_path / 'no'} does not exist"]
