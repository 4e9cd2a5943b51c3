"""On the real default model (SmolLM2-135M-Instruct), the estimate matches a measured training step.

Slow (loads the GGUF, ~15 s, and trains a step of a 135M model): run with `pytest -m slow`.
"""

import pytest

from qra.models import load_config, load_model, resolve_model
from qra.plans.memory import estimate_memory, uniform_settings
from qra.plans.schema import Device, Training
from qra.plans.spec import spec_from_config
from qra.runtime.measure import measure_lora_step

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "training",
    [Training(batch_size=2, seq_len=128), Training(batch_size=2, seq_len=256, gradient_checkpointing=True)],
    ids=["plain", "checkpointed"],
)
def test_smollm2_estimate_matches_measured_step_within_5_percent(training):
    source = resolve_model("smollm2-135m")
    spec = spec_from_config(load_config(source))
    model, _ = load_model(source, training.compute_dtype)
    settings_for = uniform_settings(16, 8)
    measured = measure_lora_step(model, spec, settings_for, training)
    estimate = estimate_memory(spec, settings_for, training, Device(kind="cpu"))
    assert estimate.persistent_bytes == pytest.approx(measured.total_bytes, rel=0.05)


def test_smollm2_gguf_saves_as_a_plain_folder_that_reloads(tmp_path):
    """materialize quantizes from a Hugging Face folder: the GGUF model must save as one."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(resolve_model("smollm2-135m"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 30
