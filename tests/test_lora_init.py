"""Where adapters start: zero, the weight-space correction of the quantization error (LoftQ), or its
output-space correction on the calibration inputs (CLoQ); in the plan, in the search's runs and in materialize's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qra.compiler.qcache import CachedWeights, QuantCache
from qra.plans.build import model_ref, uniform_plan
from qra.plans.io import dump_plan, load_plan, save_plan
from qra.plans.memory import plan_settings
from qra.plans.schema import Budget, Device, ModuleOverride, Training
from qra.runtime.lora_init import Decomposition, calibration_hessians, decompose, hessian_factor
from qra.runtime.quantize import GPTQModelWeights
from qra.runtime.run import open_run
from qra.testing import save_tiny_model, tiny_spec

GROUP = 32
RANK = 4


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """`||E X||_F²` for `H = X Xᵀ`: the squared output error a weight error `E` makes on the inputs X."""
    error = error.double()
    return float(torch.trace(error @ hessian.double() @ error.T))


def random_hessian(features: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # correlated inputs with a few dominant directions, as a layer's real inputs have
    x = torch.randn(tokens, features, generator=generator) @ torch.randn(features, features, generator=generator)
    x[:, :3] *= 10
    return x.T @ x


def test_the_factors_times_the_scale_are_the_truncated_correction():
    decomposition = decompose(torch.randn(24, 16), torch.randn(24, 16), rank=8)
    a, b = decomposition.factors(5, scale=2.0)
    assert a.shape == (5, 16) and b.shape == (24, 5)
    torch.testing.assert_close(2.0 * b @ a, decomposition.correction(5), rtol=1e-5, atol=1e-5)


def test_the_residual_init_at_full_rank_restores_the_float_weight_and_below_it_is_the_best_rank_r_correction():
    weight, quantized = torch.randn(24, 16), torch.randn(24, 16)
    error = weight - quantized
    torch.testing.assert_close(decompose(weight, quantized, rank=16).correction(16), error, rtol=1e-4, atol=1e-4)
    singular = torch.linalg.svdvals(error.double())
    left = error - decompose(weight, quantized, rank=RANK).correction(RANK)
    # Eckart-Young: what a rank-r correction leaves is the norm of the singular values past r
    assert float(left.double().norm()) == pytest.approx(float(singular[RANK:].norm()), rel=1e-5)


def test_the_calibrated_init_leaves_less_output_error_than_the_residual_and_zero_inits():
    weight, quantized = torch.randn(32, 24), torch.randn(32, 24)
    hessian = random_hessian(24, 200, seed=1)
    error = weight - quantized
    calibrated = decompose(weight, quantized, RANK, hessian_factor(hessian)).correction(RANK)
    residual = decompose(weight, quantized, RANK).correction(RANK)
    assert output_error(error - calibrated, hessian) <= output_error(error - residual, hessian) * (1 + 1e-6)
    assert output_error(error - calibrated, hessian) < output_error(error, hessian)
    # and the residual init is the better one in weight space, as it is built to be
    assert float((error - residual).norm()) <= float((error - calibrated).norm()) * (1 + 1e-6)


def test_old_plans_load_and_dump_unchanged_and_the_init_resolves_module_then_layer_then_plan(tmp_path):
    spec = tiny_spec("llama", layers=2)
    plan = uniform_plan(spec, model_ref(spec, "tiny", None), Budget(bytes=10**9, text="1GB"), 4, 8, group_size=GROUP,
                        training=Training(), device=Device(kind="cpu"))
    assert "lora_init" not in dump_plan(plan)  # a zero-init plan reads and hashes as plans always did
    assert plan.module_settings(0, "self_attn.q_proj").lora_init == "zeros"
    plan = plan.model_copy(update={"training": Training(lora_init="calibrated")})
    layers = [plan.layers[0].model_copy(update={"lora_init": "residual", "modules": {"down_proj": ModuleOverride(lora_init="zeros")}}),
              plan.layers[1]]
    plan = plan.model_copy(update={"layers": layers})
    save_plan(plan, tmp_path / "plan.yaml")
    again = load_plan(tmp_path / "plan.yaml")
    assert again == plan
    assert again.module_settings(0, "mlp.down_proj").lora_init == "zeros"
    assert again.module_settings(0, "self_attn.q_proj").lora_init == "residual"
    assert again.module_settings(1, "self_attn.q_proj").lora_init == "calibrated"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama", layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sequences = torch.randint(0, model.config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": part, "attention_mask": torch.ones_like(part), "labels": part} for part in sequences.split(4)]
    return folder, model, tiny_spec("llama", layers=2), calibration


def test_on_every_module_of_a_tiny_model_the_calibrated_init_leaves_the_least_error_on_the_calibration_inputs(tiny):
    _, model, spec, calibration = tiny
    cache = QuantCache(model, spec, calibration, group_size=GROUP)
    hessians = calibration_hessians(model, spec, calibration)
    for bits in (2, 4):
        for index, layer in enumerate(spec.layers):
            for module in layer:
                weight = model.get_submodule(spec.module_path(index, module)).weight.detach()
                error = weight - cache.weight(index, module, bits).float()
                hessian = hessians[(index, module.role)]
                calibrated = cache.decomposition(index, module, bits, "calibrated").correction(RANK)
                residual = cache.decomposition(index, module, bits, "residual").correction(RANK)
                assert output_error(error - calibrated, hessian) <= output_error(error - residual, hessian) * (1 + 1e-6)
                assert output_error(error - calibrated, hessian) < output_error(error, hessian)


def adapter_corrections(run_model, spec, rank: int) -> dict[str, torch.Tensor]:
    """`s·B·A` of every LoRA module of an open run, by module path."""
    corrections = {}
    for name, module in run_model.named_modules():
        if hasattr(module, "lora_A"):
            path = name.split("base_model.model.", 1)[-1]
            corrections[path] = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
    return corrections


def test_materialize_and_the_search_start_each_adapter_at_its_weights_correction_from_the_same_calibration(tiny, tmp_path):
    folder, _, spec, calibration = tiny
    plan = uniform_plan(spec, model_ref(spec, str(folder), None), Budget(bytes=10**9, text="1GB"), 4, RANK, group_size=GROUP,
                        training=Training(seq_len=48, batch_size=4, steps=2, lora_init="calibrated"), device=Device(kind="cpu"))
    settings_for = plan_settings(plan)
    # gptqmodel's TORCH layers run in bf16 (or fp16): materialize's model, so the search's, computes in bf16 here
    float_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    factors = {key: hessian_factor(h) for key, h in calibration_hessians(float_model, spec, calibration).items()}
    never = lambda step, micro: pytest.fail("no step is taken")  # noqa: E731

    sequences = [row.tolist() for batch in calibration for row in batch["input_ids"]]
    weights = GPTQModelWeights(folder, spec, sequences, tmp_path / "quantized", "bfloat16", calibration_batches=calibration)
    with open_run(weights, spec, settings_for, plan.training, never) as run:
        materialized = adapter_corrections(run.model, spec, RANK)
        for index, layer in enumerate(spec.layers):
            for module in layer:
                path = spec.module_path(index, module)
                packed = run.model.get_submodule("base_model.model." + path).base_layer
                own = decompose(float_model.get_submodule(path).weight.detach(), packed.dequantize_weight(num_itr=1).T,
                                RANK, factors[(index, module.role)])
                torch.testing.assert_close(materialized[path], own.correction(RANK), rtol=1e-4, atol=1e-5)

    cache = QuantCache(model, spec, calibration, group_size=GROUP)
    with open_run(CachedWeights(cache), spec, settings_for, plan.training, never) as run:
        searched = adapter_corrections(run.model, spec, RANK)
    for index, layer in enumerate(spec.layers):
        for module in layer:
            path = spec.module_path(index, module)
            own = decompose(float_model.get_submodule(path).weight.detach(), cache.weight(index, module, 4),
                            RANK, factors[(index, module.role)])
            torch.testing.assert_close(searched[path], own.correction(RANK), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.get_submodule(spec.module_path(0, spec.layers[0][0])).weight,
                               float_model.get_submodule(spec.module_path(0, spec.layers[0][0])).weight)


def test_a_decomposition_keeps_the_components_it_was_asked_for_and_refuses_a_larger_rank():
    decomposition = Decomposition(torch.ones(4, 2), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="above the 2 components"):
        decomposition.factors(3, 1.0)
