"""experiments/weight_source_gap.py reads each module's bits from gptqmodel's own config and tabulates both sources."""

import json

from weight_source_gap import markdown, planned_bits

from qra.runtime.quantize import gptq_dynamic
from qra.testing import tiny_spec


def test_the_bits_are_read_back_from_the_dynamic_config_the_quantization_pass_wrote(tmp_path):
    spec = tiny_spec("llama", layers=2)

    class Settings:
        def __init__(self, bits):
            self.bits, self.group_size = bits, 32

    settings_for = lambda index, module: Settings(16 if module.name == "self_attn.v_proj" else 8 if index == 0 else 4)  # noqa: E731
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "dynamic": gptq_dynamic(spec, settings_for)}))
    bits = planned_bits(tmp_path)
    assert bits["model.layers.0.mlp.down_proj"] == 8 and bits["model.layers.1.self_attn.q_proj"] == 4
    assert "model.layers.0.self_attn.v_proj" not in bits  # kept at 16 bits
    assert len(bits) == 2 * (len(spec.layers[0]) - 1)


def test_the_table_gives_each_sources_loss_per_task_and_weight_error():
    loss = lambda mean: {"mean": mean, "se": 0.01, "by_task": {"a": mean - 0.1, "b": mean + 0.1}}  # noqa: E731
    result = {"modules": 3, "held_out_loss": {"float": loss(3.0), "cached": loss(3.1), "gptqmodel": loss(3.05)},
              "squared_weight_error": {"cached": 1200.0, "gptqmodel": 1000.0}}
    text = markdown(result)
    assert "| gptqmodel | 3.0500 ± 0.0100 | 2.9500 | 3.1500 | 1,000 |" in text
    assert "| float | 3.0000 ± 0.0100 | 2.9000 | 3.1000 |  |" in text


def test_fine_tuned_sources_are_compared_with_the_cached_weights_paired_by_seed():
    run = lambda seed, a, b: {"seed": seed, "mean": (a + b) / 2, "se": 0.01, "by_task": {"a": a, "b": b}}  # noqa: E731
    loss = {"mean": 3.0, "se": 0.01, "by_task": {"a": 2.9, "b": 3.1}}
    result = {"modules": 3, "held_out_loss": {"float": loss}, "squared_weight_error": {},
              "fine_tuned": {"cached": [run(10, 3.0, 1.0), run(11, 3.0, 1.2)],
                             "gptqmodel": [run(10, 2.9, 1.1), run(11, 2.95, 1.25)]}}
    text = markdown(result)
    assert "| cached | 10, 11 | 2.0500 | 3.0000 | 1.1000 |  |  |  |" in text
    # paired by seed: a −0.1 and −0.05 (mean −0.075, SE 0.025); b +0.1 and +0.05
    assert "| gptqmodel | 10, 11 | 2.0500 | 2.9250 | 1.1750 | +0.0000 ± 0.0000 | -0.0750 ± 0.0250 | +0.0750 ± 0.0250 |" in text
