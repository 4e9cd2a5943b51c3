"""The exact GGUF: GPTQ's integers become GGML blocks without re-quantizing, so every tensor llama.cpp reads
back is, to the bit, the weight the run computed with; and what cannot be written exactly is refused."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qra.errors import QraError
from qra.plans.build import model_ref
from qra.plans.memory import plan_settings
from qra.plans.schema import Budget, LayerPlan, ModuleOverride, Plan
from qra.runtime.package.ggml_blocks import encode
from qra.runtime.package.gguf_exact import base_tensors, check_transcodable, transcode
from qra.runtime.package.gguf_write import permute_rotary, write_gguf
from qra.runtime.qlinear import is_gptq_linear
from qra.runtime.quantize import load_quantized, quantize_to_plan
from qra.testing import VOCAB, save_tiny_model, tiny_spec, tiny_tokenizer

Q = gguf.GGMLQuantizationType
# two layers, every planned width: layer 0 at 2 bits (o_proj at 4), layer 1 at 3 bits (v_proj at 8)
LAYERS = [LayerPlan(index=0, bits=2, group_size=64, rank=4, alpha=8.0, modules={"self_attn.o_proj": ModuleOverride(bits=4)}),
          LayerPlan(index=1, bits=3, group_size=32, rank=4, alpha=8.0, modules={"self_attn.v_proj": ModuleOverride(bits=8)})]


def test_q4_0_blocks_hold_scale_times_code_minus_eight_exactly():
    rng = np.random.default_rng(0)
    differences = rng.integers(-8, 8, size=(3, 64))
    scales = rng.uniform(1e-3, 1e-1, size=(3, 2)).astype(np.float16)
    blocks = encode(differences, scales, Q.Q4_0)
    assert blocks.shape == (3, 2 * 18)  # fp16 d + 16 bytes of nibbles per 32 weights
    expected = scales.astype(np.float32).repeat(32, axis=1) * differences
    assert np.array_equal(gguf.quants.dequantize(blocks, Q.Q4_0), expected)


def test_q8_0_blocks_hold_scale_times_code_exactly():
    rng = np.random.default_rng(1)
    differences = rng.integers(-128, 128, size=(2, 96))
    scales = rng.uniform(1e-4, 1e-2, size=(2, 3)).astype(np.float16)
    blocks = encode(differences, scales, Q.Q8_0)
    assert blocks.shape == (2, 3 * 34)
    assert np.array_equal(gguf.quants.dequantize(blocks, Q.Q8_0), scales.astype(np.float32).repeat(32, axis=1) * differences)


def test_codes_a_block_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"outside \[-8, 7\]"):
        encode(np.full((1, 32), 8), np.ones((1, 1), np.float16), Q.Q4_0)
    with pytest.raises(ValueError, match="blocks of 32"):
        encode(np.zeros((1, 48), int), np.ones((1, 1), np.float16), Q.Q4_0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def quantized(request, tmp_path_factory) -> tuple[str, Plan, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(f"exact-{family}")
    spec = tiny_spec(family, layers=2)
    plan = Plan(model=model_ref(spec, f"tiny-{family}", None), budget=Budget(bytes=10**9, text="1 GB"), layers=LAYERS)
    base = save_tiny_model(root / "base", family, layers=2)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, VOCAB, (64,), generator=generator).tolist() for _ in range(8)]
    return family, plan, quantize_to_plan(base, spec, plan_settings(plan), calibration, root / "quantized")


def test_every_transcoded_tensor_reads_back_as_the_weight_the_run_computed_with(quantized, tmp_path):
    family, plan, folder = quantized
    model = load_quantized(folder).model  # as the run holds it: bf16 scales
    tensors = base_tensors(model)
    path = tmp_path / "model.gguf"
    write_gguf(tensors, model.config, tiny_tokenizer(), folder, path, "tiny")
    read = {tensor.name: tensor for tensor in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if family == "llama" else gguf.MODEL_ARCH.QWEN2, 2)
    widths = set()
    for name, module in model.named_modules():
        if not is_gptq_linear(module):
            continue
        widths.add(module.bits)
        tensor = read[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert Q(tensor.tensor_type) == (Q.Q8_0 if module.bits == 8 else Q.Q4_0), name
        in_file = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        trained = module.dequantize_weight().t()  # [out, in], bf16: what the run multiplied by
        heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}.get(name.rsplit(".", 1)[1])
        if family == "llama" and heads is not None:
            trained = permute_rotary(trained, heads)
        # llama.cpp's weight is s·(q−z) exactly, in fp32; the run rounded that same product to bf16
        assert torch.equal(in_file.to(torch.bfloat16), trained), name
    assert widths == {2, 3, 4, 8}


def test_a_module_whose_blocks_span_two_groups_is_refused_naming_the_lossy_option(quantized):
    _, _, folder = quantized
    model = load_quantized(folder).model
    name, module = next((n, m) for n, m in model.named_modules() if is_gptq_linear(m))
    module.g_idx = torch.arange(module.in_features, dtype=module.g_idx.dtype) % module.g_idx.max().add(1)  # act-order-like
    with pytest.raises(QraError, match="--gguf-mix") as error:
        transcode(module, name)
    assert "\n" not in str(error.value)


def test_a_plan_gguf_cannot_hold_exactly_is_refused_before_any_training():
    spec = tiny_spec("llama", layers=2)
    odd = [LayerPlan(index=i, bits=4, group_size=16, rank=4, alpha=8.0) for i in range(2)]
    plan = Plan(model=model_ref(spec, "tiny", None), budget=Budget(bytes=10**9, text="1 GB"), layers=odd)
    with pytest.raises(QraError, match="group size 16.*--gguf-mix"):
        check_transcodable(spec, plan_settings(plan))
    check_transcodable(spec, plan_settings(Plan(model=plan.model, budget=plan.budget, layers=LAYERS)))


def test_materialize_refuses_a_plan_gguf_cannot_hold_exactly_in_one_line_before_any_training(tmp_path):
    from typer.testing import CliRunner

    from qra.cli import app
    from qra.plans.io import save_plan
    from test_materialize import mixed_plan
    from qra.testing import save_tiny_model, tiny_corpus

    folder = save_tiny_model(tmp_path / "model", layers=4)
    plan = mixed_plan(folder)
    plan = plan.model_copy(update={"layers": [layer.model_copy(update={"group_size": 16}) for layer in plan.layers]})
    save_plan(plan, tmp_path / "plan.yaml")
    corpus = tiny_corpus(tmp_path / "corpus.jsonl")
    result = CliRunner().invoke(app, ["materialize", str(tmp_path / "plan.yaml"), "-o", str(tmp_path / "out"),
                                      "--data", str(corpus), "--format", "adapter,gguf"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "--gguf-mix" in result.output and "group size 16" in result.output
    assert not (tmp_path / "out").exists()
    # the lossy single file takes any group size; a mix llama.cpp does not know is refused just as early
    accepted = CliRunner().invoke(app, ["materialize", str(tmp_path / "plan.yaml"), "-o", str(tmp_path / "out"), "--data",
                                        str(corpus), "--format", "adapter,gguf", "--gguf-mix", "q4_k_m", "--check"])
    assert accepted.exit_code == 0, accepted.output
    unknown = CliRunner().invoke(app, ["materialize", str(tmp_path / "plan.yaml"), "-o", str(tmp_path / "out"), "--data",
                                       str(corpus), "--format", "gguf", "--gguf-mix", "q4_z"])
    assert unknown.exit_code == 2 and "unknown --gguf-mix 'q4_z'" in unknown.output
    assert not (tmp_path / "out").exists()
