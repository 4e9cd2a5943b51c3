"""The `qra` command line, as a user meets it: estimates without weights, plans written, shown, compared and
verified, and every bad input answered with exit status 2 and one `error:` line, never a traceback.

Exit statuses: 0 done / verified; 1 a check failed (over budget, fingerprint mismatch); 2 unusable input.
Most tests run the app in-process (CliRunner keeps stdout and stderr apart); a few run the installed
`qra` script, to see what a shell sees.
"""

import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qra.cli import app
from qra.errors import QraError
from qra.units import parse_bytes
from tiny import tiny_config

SHIPPED_CONFIGS = Path(__file__).parents[1] / "src" / "qra" / "configs"
QRA = shutil.which("qra", path=str(Path(sys.executable).parent)) or shutil.which("qra")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run `qra ARGS` in-process; an exception other than the CLI's own exit is a bug, so it is re-raised."""
    result = runner.invoke(app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_one_error_line(result, exit_code: int = 2) -> str:
    """Unusable input: the given exit status, nothing on stdout, exactly one `error:` line on stderr."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def write_tiny_config(folder: Path, family: str = "llama", layers: int = 4) -> Path:
    """A config.json (no weights) of a tiny Llama / Qwen2 model, in its own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    tiny_config(family, layers).to_json_file(path)
    return path


def new_plan(runner: CliRunner, output: Path, model: Path | str, budget: str = "8GB", *options: str) -> Path:
    result = invoke(runner, "plan", "new", "--output", output, "--budget", budget, "--model", model, *options)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {output}")
    return output


def estimate_json(runner: CliRunner, model: Path | str, bits: int = 4, rank: int = 8) -> dict[str, int]:
    result = invoke(runner, "estimate", "--model", model, "--bits", bits, "--rank", rank, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_well_formed_estimate(estimate: dict[str, int]) -> None:
    """`total_bytes` is the sum of the components, and every entry is a whole, non-negative number of bytes."""
    assert all(type(value) is int and value >= 0 for value in estimate.values()), estimate
    components = {name: value for name, value in estimate.items() if name != "total_bytes"}
    assert components
    assert estimate["total_bytes"] == sum(components.values())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Config-only tiny models and a verified 4-bit rank-8 plan for the 4-layer Llama."""
    root = tmp_path_factory.mktemp("tiny")
    models = {
        "llama4": write_tiny_config(root / "llama4", "llama", 4),
        "llama6": write_tiny_config(root / "llama6", "llama", 6),
        "qwen4": write_tiny_config(root / "qwen4", "qwen2", 4),
    }
    models["plan"] = new_plan(CliRunner(), root / "plan.yaml", models["llama4"])
    return models


# --- budgets as users type them ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8 * 10**9),
        ("8GiB", 8 * 2**30),
        ("300MB", 300 * 10**6),
        ("123456", 123456),
        ("1.5GB", 1_500_000_000),
        ("8 gb", 8 * 10**9),
    ],
)
def test_parse_bytes_reads_si_units_as_powers_of_ten_and_iec_units_as_powers_of_two(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["eight GB", "-1GB", "0", "8XB", ""])
def test_parse_bytes_refuses_what_is_not_a_positive_size_with_one_line(text):
    with pytest.raises(QraError) as raised:
        parse_bytes(text)
    assert raised.value.exit_code == 2
    assert "\n" not in str(raised.value)
    assert repr(text) in str(raised.value)


# --- estimate ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["config.json", "some_name.json"])
def test_estimate_needs_only_a_config_json_whatever_its_name(runner, tmp_path, file_name):
    config = tmp_path / file_name
    shutil.copy(SHIPPED_CONFIGS / "llama-3-8b.json", config)
    from_file = estimate_json(runner, config)
    assert_well_formed_estimate(from_file)
    assert from_file == estimate_json(runner, "llama-3-8b")


@pytest.mark.parametrize("alias", ["llama-3-8b", "qwen2.5-7b", "mistral-7b"])
def test_estimate_accepts_the_shipped_aliases(runner, alias):
    assert_well_formed_estimate(estimate_json(runner, alias))


def test_estimate_of_llama_3_8b_at_4_bits_packs_its_linears_into_about_4_gb(runner):
    estimate = estimate_json(runner, "llama-3-8b", bits=4)
    assert 3.3e9 <= estimate["quantized_weights"] <= 4.2e9


def test_estimate_of_llama_3_8b_at_16_bits_quantizes_nothing_and_keeps_16_gb_of_bf16_weights(runner):
    estimate = estimate_json(runner, "llama-3-8b", bits=16)
    assert estimate["quantized_weights"] == 0
    assert 15.5e9 <= estimate["frozen_weights"] <= 16.5e9


def test_estimate_prints_a_table_and_exits_1_when_over_the_given_budget(runner, tiny):
    result = invoke(runner, "estimate", "--model", tiny["llama4"], "--bits", 4, "--rank", 8, "--budget", "1MB")
    assert result.exit_code == 1
    assert "memory estimate" in result.stdout
    assert "does not fit" in result.stdout


def test_estimate_of_the_default_smollm2_gguf_reads_its_header(runner):
    estimate = estimate_json(runner, "smollm2-135m")
    assert_well_formed_estimate(estimate)
    assert estimate["quantized_weights"] > 0


# --- bad input: exit 2, one line -----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["eight GB", "-1GB", "0"])
def test_plan_new_refuses_a_budget_that_is_not_a_positive_size(runner, tiny, tmp_path, budget):
    result = invoke(runner, "plan", "new", "--output", tmp_path / "p.yaml", "--budget", budget, "--model", tiny["llama4"])
    line = assert_one_error_line(result)
    assert repr(budget) in line
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("command", [["estimate", "--rank", "8"], ["plan", "new", "--output", "p.yaml", "--budget", "8GB"]])
def test_bits_5_is_refused_naming_the_supported_widths(runner, tiny, tmp_path, command):
    result = invoke(runner, *command, "--bits", 5, "--model", tiny["llama4"])
    assert "--bits 5" in assert_one_error_line(result)


def test_a_missing_model_path_is_one_line_that_lists_what_model_accepts(runner):
    result = invoke(runner, "estimate", "--model", "/nonexistent/folder", "--bits", 4, "--rank", 8)
    line = assert_one_error_line(result)
    assert "/nonexistent/folder" in line
    assert "llama-3-8b" in line


def test_a_seq_len_above_the_models_positions_is_one_line_naming_the_limit(runner):
    result = invoke(runner, "estimate", "--model", "llama-3-8b", "--bits", 4, "--rank", 8, "--seq-len", 8193)
    assert "seq_len 8193 is above the model's limit of 8192 positions" in assert_one_error_line(result)


def test_a_hub_id_without_network_fails_fast_with_one_line(runner):
    started = time.monotonic()
    result = invoke(runner, "estimate", "--model", "someorg/somemodel", "--bits", 4, "--rank", 8)
    elapsed = time.monotonic() - started
    assert "someorg/somemodel" in assert_one_error_line(result)
    assert elapsed < 10


def edited_plan(source: Path, target: Path, edit) -> Path:
    data = yaml.safe_load(source.read_text())
    edit(data)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def _set_first_layer(field: str, value):
    return lambda data: data["layers"][0].__setitem__(field, value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda data: data.__setitem__("schema_version", 99), "schema_version 99"),
        (_set_first_layer("bits", 5), "layers[0].bits"),
        (_set_first_layer("rank", -1), "layers[0].rank"),
    ],
    ids=["unknown-schema-version", "bits-5", "rank-minus-1"],
)
def test_plan_verify_refuses_an_invalid_plan_naming_what_is_wrong(runner, tiny, tmp_path, edit, expected):
    bad = edited_plan(tiny["plan"], tmp_path / "bad.yaml", edit)
    assert expected in assert_one_error_line(invoke(runner, "plan", "verify", bad, "--model", tiny["llama4"]))


def test_plan_verify_refuses_malformed_yaml_with_its_line_number(runner, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nmodel: {id: [unclosed\n")
    line = assert_one_error_line(invoke(runner, "plan", "verify", bad))
    assert "not valid YAML" in line
    assert "line" in line


def test_plan_verify_refuses_a_model_with_another_layer_count(runner, tiny):
    result = invoke(runner, "plan", "verify", tiny["plan"], "--model", tiny["llama6"])
    line = assert_one_error_line(result)
    assert "4 layers" in line
    assert "6" in line


def test_a_new_plan_clips_gradients_at_the_norm_given_and_zero_turns_clipping_off(runner, tiny, tmp_path):
    from qra.plans.io import load_plan

    assert load_plan(new_plan(runner, tmp_path / "a.yaml", tiny["llama4"], "8GB", "--max-grad-norm", "0.5")).training.max_grad_norm == 0.5
    assert load_plan(new_plan(runner, tmp_path / "b.yaml", tiny["llama4"], "8GB", "--max-grad-norm", "0")).training.max_grad_norm is None
    result = invoke(runner, "plan", "new", "--output", tmp_path / "c.yaml", "--budget", "8GB", "--model", tiny["llama4"],
                    "--max-grad-norm", "-1")
    assert "--max-grad-norm" in assert_one_error_line(result)
    assert not (tmp_path / "c.yaml").exists()


# --- plan new + plan verify ----------------------------------------------------------------------------------


def test_a_new_plan_within_its_budget_verifies_against_its_model(runner, tiny):
    result = invoke(runner, "plan", "verify", tiny["plan"], "--model", tiny["llama4"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("verified:")
    assert "recomputed from the model" in result.stdout


def test_a_plan_whose_estimate_exceeds_its_budget_is_not_verified(runner, tiny, tmp_path):
    small = tmp_path / "small.yaml"
    result = invoke(runner, "plan", "new", "--output", small, "--budget", "1MB", "--model", tiny["llama4"])
    assert result.exit_code == 0
    assert "does NOT fit" in result.stdout
    verdict = invoke(runner, "plan", "verify", small, "--model", tiny["llama4"])
    assert verdict.exit_code == 1
    assert verdict.stdout == ""
    assert verdict.stderr.startswith("not verified:")
    assert "exceeds the budget" in verdict.stderr


def test_a_plan_checked_against_another_architecture_fails_its_fingerprint(runner, tiny):
    result = invoke(runner, "plan", "verify", tiny["plan"], "--model", tiny["qwen4"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "fingerprint" in result.stderr
    assert "Traceback" not in result.output


def test_without_model_verify_falls_back_to_the_recorded_memory_when_the_plan_model_is_gone(runner, tmp_path):
    config = write_tiny_config(tmp_path / "gone")
    plan = new_plan(runner, tmp_path / "plan.yaml", config)
    shutil.rmtree(config.parent)
    result = invoke(runner, "plan", "verify", plan)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("verified:")
    assert "as recorded in the plan (model not available)" in result.stdout


def test_the_fallback_also_covers_a_gone_relative_folder_that_looks_like_a_hub_id(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_config(tmp_path / "models" / "tiny")
    plan = new_plan(runner, Path("plan.yaml"), "models/tiny")
    shutil.rmtree(tmp_path / "models")
    result = invoke(runner, "plan", "verify", plan)
    assert result.exit_code == 0, result.stderr
    assert "as recorded in the plan (model not available)" in result.stdout
    assert invoke(runner, "plan", "show", plan).exit_code == 0


# --- plan show, plan diff ------------------------------------------------------------------------------------


def layer_rows(table_text: str) -> list[int]:
    """The layer numbers of a printed plan table's rows."""
    return [int(line.split("│")[1]) for line in table_text.splitlines() if line.startswith("│") and line.split("│")[1].strip().isdigit()]


@pytest.mark.parametrize("with_model", [True, False], ids=["sized-by-model", "plan-only"])
def test_plan_show_prints_one_row_per_layer(runner, tiny, tmp_path, with_model):
    plan = new_plan(runner, tmp_path / "six.yaml", tiny["llama6"])
    result = invoke(runner, "plan", "show", plan, *(["--model", tiny["llama6"]] if with_model else []))
    assert result.exit_code == 0, result.stderr
    assert layer_rows(result.stdout) == list(range(6))
    assert "memory estimate" in result.stdout


def test_plan_diff_lists_each_layer_whose_rank_changed(runner, tiny, tmp_path):
    rank16 = new_plan(runner, tmp_path / "rank16.yaml", tiny["llama4"], "8GB", "--rank", "16")
    result = invoke(runner, "plan", "diff", tiny["plan"], rank16)
    assert result.exit_code == 0
    for index in range(4):
        assert f"layer {index}: rank 8 -> 16" in result.stdout


def test_plan_diff_of_identical_plans_says_they_are_the_same(runner, tiny, tmp_path):
    copy = tmp_path / "copy.yaml"
    shutil.copy(tiny["plan"], copy)
    result = invoke(runner, "plan", "diff", tiny["plan"], copy)
    assert result.exit_code == 0
    assert result.stdout.strip() == "the plans are the same"


# --- the installed script, as a shell runs it ----------------------------------------------------------------


def run_qra(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if QRA is None:
        pytest.skip("the qra script is not installed")
    return subprocess.run([QRA, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_script_version_prints_the_installed_version(tmp_path):
    done = run_qra("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"qra {importlib.metadata.version('qra')}\n"
    assert done.stderr == ""


def test_script_help_opens_with_what_qra_does_for_a_user(tmp_path):
    done = run_qra("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "qra fine-tunes a language model within a memory budget" in text
    assert "--version" in text


def test_script_estimate_json_prints_only_the_json_object(tmp_path):
    config = tmp_path / "config.json"
    shutil.copy(SHIPPED_CONFIGS / "llama-3-8b.json", config)
    done = run_qra("estimate", "--model", config, "--bits", "4", "--rank", "8", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_well_formed_estimate(json.loads(done.stdout))
    assert done.stderr == ""


def test_script_bad_budget_is_exit_2_and_one_stderr_line_without_traceback(tmp_path):
    done = run_qra("plan", "new", "--output", "p.yaml", "--budget", "eight GB", "--model", "llama-3-8b", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: budget 'eight GB'"), done.stderr


def test_script_plan_for_another_model_is_exit_2_and_one_stderr_line_without_library_noise(runner, tiny, tmp_path):
    """Sizing a model imports transformers (and through it torchao and torch) before this error is found:
    none of their log lines may join the one error line."""
    done = run_qra("plan", "verify", tiny["plan"], "--model", tiny["llama6"], cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: the plan has 4 layers"), done.stderr


def test_compile_refuses_a_negative_worker_count_with_one_line(runner, tiny, tmp_path):
    result = invoke(runner, "compile", "--output", tmp_path / "p.yaml", "--budget", "8GB", "--model", tiny["llama4"],
                    "--workers", -1)
    assert "--workers" in assert_one_error_line(result)
    assert not (tmp_path / "p.yaml").exists()


def test_plan_new_writes_where_adapters_start_and_refuses_an_unknown_init(runner, tiny, tmp_path):
    path = new_plan(runner, tmp_path / "p.yaml", tiny["llama4"], "8GB", "--lora-init", "calibrated")
    assert "lora_init: calibrated" in path.read_text()
    result = invoke(runner, "plan", "new", "--output", tmp_path / "q.yaml", "--budget", "8GB", "--model", tiny["llama4"],
                    "--lora-init", "svd")
    assert "--lora-init" in assert_one_error_line(result)
    assert not (tmp_path / "q.yaml").exists()
