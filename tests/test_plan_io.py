"""Plan files: what is written reads back equal, saving is atomic, and every bad file fails in one line.

Also the human views of a plan: its per-layer table and the diff between two plans.
"""

from pathlib import Path

import pytest

from qra import files
import yaml
from rich.console import Console

from qra.errors import QraError
from qra.plans import io as plan_io
from qra.plans.build import budget_covering
from qra.plans.io import dump_plan, load_plan, save_plan
from qra.plans.memory import estimate_plan
from qra.plans.report import memory_table, plan_diff, plan_table
from qra.plans.schema import Budget, Plan
from qra.testing import tiny_spec
from qra.units import format_bytes

FINGERPRINT = "0123456789abcdef" * 4


def make_plan(num_layers: int = 4, **changes) -> Plan:
    """A valid plan for the tiny 4-layer llama: 4-bit rank-8 layers, one with a down_proj override."""
    layers = [{"index": i, "bits": 4, "group_size": 128, "rank": 8, "alpha": 16.0} for i in range(num_layers)]
    layers[1]["modules"] = {"down_proj": {"bits": 8, "rank": 16}}
    data = {
        "model": {"id": "tiny-llama", "architecture": "LlamaForCausalLM", "num_layers": num_layers, "fingerprint": FINGERPRINT},
        "budget": {"bytes": 8 * 10**9, "text": "8GB"},
        "layers": layers,
        "provenance": {"strategy": "bayes", "created": "2025-01-01T12:00:00", "note": "yes"},
        **changes,
    }
    return Plan.model_validate(data)


def plan_data(plan: Plan | None = None) -> dict:
    """The plan as the mapping a YAML file holds, for editing into a bad file."""
    return yaml.safe_load(dump_plan(plan or make_plan()))


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(path: Path) -> QraError:
    with pytest.raises(QraError) as caught:
        load_plan(path)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "\n" not in message, "errors are one line"
    assert str(path) in message, "errors name the file"
    return caught.value


def rendered(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


# --- round trip and atomic save ---------------------------------------------------------------


def test_a_dumped_plan_loads_back_equal(tmp_path):
    plan = make_plan(memory={"components": {"context": 5}, "total_bytes": 5, "headroom_bytes": -3})
    path = tmp_path / "plan.yaml"
    path.write_text(dump_plan(plan))
    assert load_plan(path) == plan


def test_the_yaml_keeps_schema_order_and_one_line_per_layer():
    text = dump_plan(make_plan())
    assert list(yaml.safe_load(text)) == list(Plan.model_fields)
    layer_lines = [line for line in text.splitlines() if line.startswith("- {index:")]
    assert len(layer_lines) == 4
    assert "modules: {down_proj: {bits: 8, rank: 16}}" in layer_lines[1]


def test_save_then_load_is_the_same_plan_and_leaves_no_temporary_file(tmp_path):
    plan = make_plan()
    save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_a_save_that_fails_while_rendering_leaves_the_existing_plan_untouched(tmp_path, monkeypatch):
    path = tmp_path / "plan.yaml"
    save_plan(make_plan(), path)
    before = path.read_text()

    def broken_dump(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(plan_io.yaml, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        save_plan(make_plan(num_layers=2), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_a_save_that_fails_while_writing_leaves_the_existing_plan_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.yaml"
    save_plan(make_plan(), path)
    before = path.read_text()

    def failing_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(QraError, match="cannot write plan .*No space left on device"):
        save_plan(make_plan(num_layers=2), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


# --- bad files fail in one line, naming the file and the field ---------------------------------


def test_a_missing_file_is_an_error_naming_the_path(tmp_path):
    error = load_error(tmp_path / "nowhere.yaml")
    assert "does not exist" in str(error)


def test_malformed_yaml_is_an_error_with_the_line(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("schema_version: 1\nlayers: [1, 2\nbudget: 3\n")
    error = load_error(path)
    assert "is not valid YAML" in str(error)
    assert "line 3" in str(error)


@pytest.mark.parametrize("content", ["", "- 1\n- 2\n", "just text\n"])
def test_a_file_that_is_not_a_mapping_is_an_error(tmp_path, content):
    path = tmp_path / "plan.yaml"
    path.write_text(content)
    assert "is not a qra plan" in str(load_error(path))


def test_an_unknown_schema_version_is_refused_before_its_fields_are_checked(tmp_path):
    data = {**plan_data(), "schema_version": 7, "from_the_future": True}
    error = load_error(write_yaml(tmp_path / "plan.yaml", data))
    assert str(error).endswith("has schema_version 7; this qra reads schema_version 1")


def test_a_missing_schema_version_is_an_error(tmp_path):
    data = plan_data()
    del data["schema_version"]
    assert "has no schema_version" in str(load_error(write_yaml(tmp_path / "plan.yaml", data)))


def test_bits_5_names_the_layer_field_and_the_value(tmp_path):
    data = plan_data()
    data["layers"][3]["bits"] = 5
    error = load_error(write_yaml(tmp_path / "plan.yaml", data))
    assert str(error) == f"{tmp_path / 'plan.yaml'}: layers[3].bits: input should be 2, 3, 4, 8 or 16 (got 5)"


def test_a_negative_rank_names_the_rank(tmp_path):
    data = plan_data()
    data["layers"][2]["rank"] = -1
    error = str(load_error(write_yaml(tmp_path / "plan.yaml", data)))
    assert "layers[2].rank" in error
    assert "-1" in error


def test_a_bad_module_override_names_its_path(tmp_path):
    data = plan_data()
    data["layers"][1]["modules"]["down_proj"]["bits"] = 7
    assert "layers[1].modules.down_proj.bits" in str(load_error(write_yaml(tmp_path / "plan.yaml", data)))


def test_an_unknown_field_is_named(tmp_path):
    data = plan_data()
    data["layers"][0]["rnak"] = 8
    error = str(load_error(write_yaml(tmp_path / "plan.yaml", data)))
    assert "layers[0].rnak: unknown field" in error


def test_a_missing_field_is_named(tmp_path):
    data = plan_data()
    del data["budget"]
    assert "budget: field required" in str(load_error(write_yaml(tmp_path / "plan.yaml", data)))


def test_more_layers_than_the_model_has_is_an_error(tmp_path):
    data = plan_data()
    data["model"]["num_layers"] = 6
    error = str(load_error(write_yaml(tmp_path / "plan.yaml", data)))
    assert "the plan lists 4 layers but model.num_layers is 6" in error
    assert "Value error" not in error


# --- human views -------------------------------------------------------------------------------


def test_plan_diff_is_empty_for_identical_plans():
    assert plan_diff(make_plan(), make_plan()) == []


def test_plan_diff_lists_the_changed_layer_and_training_field():
    a = make_plan()
    data = plan_data(a)
    data["layers"][3].update(bits=3, rank=16)
    data["training"]["seq_len"] = 512
    b = Plan.model_validate(data)
    assert plan_diff(a, b) == ["training.seq_len: 256 -> 512", "layer 3: bits 4 -> 3, rank 8 -> 16"]


def test_plan_diff_shows_overrides_compactly():
    a = make_plan()
    data = plan_data(a)
    data["layers"][1]["modules"] = {}
    assert plan_diff(a, Plan.model_validate(data)) == ["layer 1: overrides down_proj: 8b r16 -> none"]


def test_plan_table_without_a_spec_has_one_row_per_layer_and_no_byte_columns():
    plan = make_plan()
    table = plan_table(plan, None)
    assert table.row_count == len(plan.layers)
    text = rendered(table)
    assert "down_proj: 8b r16" in text
    assert "base weights" not in text


def test_plan_table_with_a_spec_adds_bytes_per_layer_and_totals_that_agree_with_the_memory_model():
    plan = make_plan()
    spec = tiny_spec()
    table = plan_table(plan, spec)
    assert table.row_count == len(plan.layers) + 1
    text = rendered(table)
    components = estimate_plan(spec, plan).components
    # parameters in bfloat16, floating buffers (rotary frequencies) in fp32
    other_bytes = sum(t.numel * ((4 if t.buffer else 2) if t.floating else t.itemsize) for t in spec.other_tensors)
    base_weights = components["quantized_weights"] + components["frozen_weights"] - other_bytes
    total_line = next(line for line in text.splitlines() if "total" in line)
    assert format_bytes(base_weights) in total_line
    assert format_bytes(components["lora_parameters"]) in total_line


def test_memory_table_shows_total_budget_and_a_negative_headroom():
    text = rendered(memory_table({"weights": 600, "activations": 400}, budget_bytes=900))
    assert "60.0%" in text
    assert "1.00 kB" in text
    assert "-100 B" in text


def test_a_budget_covering_a_footprint_is_the_next_tenth_of_a_megabyte():
    assert budget_covering(1_546_100_001) == Budget(bytes=1_546_200_000, text="1546.2MB")
    assert budget_covering(1_517_900_000) == Budget(bytes=1_517_900_000, text="1517.9MB")


def test_plan_show_and_diff_name_where_adapters_start():
    a = make_plan()
    data = plan_data(a)
    data["training"]["lora_init"] = "calibrated"
    data["layers"][0]["lora_init"] = "residual"
    b = Plan.model_validate(data)
    assert plan_diff(a, b) == ["training.lora_init: zeros -> calibrated", "layer 0: lora_init none -> residual"]
    rows = rendered(plan_table(b, None)).splitlines()
    assert "residual" in next(row for row in rows if row.split("│")[1:2] == ["     0 "])
    assert sum("calibrated" in row for row in rows) == len(b.layers) - 1
