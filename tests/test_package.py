"""Serving packages of a tiny mixed-bit run: every format is complete (manifest hashes), loads the way its
card says, and computes what the trained model computes (within the precision each format works in)."""

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qra.errors import QraError
from qra.plans.build import model_ref
from qra.plans.memory import plan_settings
from qra.plans.schema import Budget, LayerPlan, ModuleOverride, Plan
from qra.plans.spec import ModelSpec
from qra.runtime.data import Example, batches, pack_text, pad_id, tokenize_examples
from qra.runtime.heldout import held_out_sums
from qra.runtime.lora import attach_lora
from qra.runtime.package import FORMATS, PackageContext, package, verify_manifest
from qra.runtime.package.adapter import load_adapter_package
from qra.runtime.package.onnx import load_fp32
from qra.runtime.quantize import gptq_dynamic, load_quantized, quantize_to_plan
from qra.testing import VOCAB, save_tiny_model, tiny_spec, tiny_tokenizer

TEXT = "Return the value of the attribute, or raise an exception when the name is not defined."
# layer: (bits, rank); layer 1 gives down_proj its own rank, layer 2 gives v_proj its own bits
LAYERS = [(2, 4), (3, 8), (4, 2), (8, 6)]
GGUF_LOGIT_CORRELATION = 0.95
GGUF_MEAN_DIFFERENCE = 0.25
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
OVERRIDES = {1: {"mlp.down_proj": ModuleOverride(rank=12)}, 2: {"self_attn.v_proj": ModuleOverride(bits=8)}}


@dataclass
class Run:
    spec: ModelSpec
    plan: Plan
    ctx: PackageContext
    folders: dict[str, Path]
    ids: torch.Tensor
    trained_logits: torch.Tensor  # the in-memory peft model over the quantized base (bf16)
    base_logits: torch.Tensor  # the same model with the adapter disabled


def _plan(spec: ModelSpec) -> Plan:
    layers = [
        LayerPlan(index=i, bits=bits, group_size=32, rank=rank, alpha=2.0 * rank, modules=OVERRIDES.get(i, {}))
        for i, (bits, rank) in enumerate(LAYERS)
    ]
    return Plan(model=model_ref(spec, "tiny-llama", None), budget=Budget(bytes=10**9, text="1 GB"), layers=layers)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _held_out(tokenizer) -> dict[str, list]:
    """Two tasks of held-out batches as materialize makes them: packed text, and prompt/response (right-padded)."""
    text = [Example("", TEXT * 3), Example("", "Objects are Python's abstraction for data. " * 4)]
    pairs = [Example("2 + 3 =", " 5"), Example("Convert 2 km to m:", " 2000"), Example("7 * 6 =", " 42")]
    return {"text": batches(pack_text(text, tokenizer, 24), 4, 0, 0, pad_id(tokenizer)),
            "pairs": batches(tokenize_examples(pairs, tokenizer, 24), 2, 0, 0, pad_id(tokenizer))}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("package")
    spec = tiny_spec("llama", layers=len(LAYERS))
    plan = _plan(spec)
    settings_for = plan_settings(plan)
    base = save_tiny_model(root / "base", "llama", layers=len(LAYERS))
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, VOCAB, (64,), generator=generator).tolist() for _ in range(8)]
    quantized = quantize_to_plan(base, spec, settings_for, calibration, root / "quantized")

    torch.manual_seed(0)
    peft_model = attach_lora(load_quantized(quantized).model, spec, settings_for)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; random values make the adapter change the outputs
            torch.nn.init.normal_(parameter, std=0.05)
    peft_model.save_pretrained(root / "adapter")
    peft_model.eval()
    tokenizer = tiny_tokenizer()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    trained = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        untrained = _logits(peft_model, ids)

    held_out = _held_out(tokenizer)
    ctx = PackageContext(
        quantized=quantized,
        adapter=root / "adapter",
        tokenizer=tokenizer,
        plan=plan,
        spec=spec,
        calibration=calibration,
        extra_manifest={"measured_memory": {"total_bytes": 123456}, "evaluation": {"held_out_loss": 5.7}},
        held_out=held_out,
        trained_sums=held_out_sums(peft_model, held_out),
    )
    folders = package(list(FORMATS), ctx, root / "out")
    return Run(spec, plan, ctx, folders, ids, trained, untrained)


def test_every_format_is_packaged_with_a_manifest_whose_hashes_match_its_files(run):
    assert list(run.folders) == list(FORMATS)
    for name, folder in run.folders.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(manifest["files"]) == files, name
        for relative, entry in manifest["files"].items():
            data = (folder / relative).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, relative
        assert verify_manifest(folder) == []
        assert manifest["format"] == name
        assert manifest["plan_fingerprint"] == run.plan.model.fingerprint
        assert set(manifest["versions"]) == {
            "torch", "transformers", "peft", "gptqmodel", "onnx", "onnxruntime", "gguf", "llama_cpp_python", "qra"
        }
        assert manifest["results"] == run.ctx.extra_manifest
        card = (folder / "README.md").read_text()
        assert "tiny-llama" in card and "| 3 | 8 | 32 | 6 | 12 | - |" in card and "1 GB" in card
    # no staging or scratch folder is left behind
    assert not [p.name for p in run.folders["adapter"].parent.iterdir() if p.name.startswith(".")]


def test_a_changed_file_breaks_the_manifest(run, tmp_path):
    package(["adapter"], run.ctx, tmp_path)
    (tmp_path / "adapter" / "plan.yaml").write_text("tampered\n")
    assert verify_manifest(tmp_path / "adapter") == ["plan.yaml: changed"]


def test_packaging_again_replaces_the_previous_package_whole(run, tmp_path):
    package(["adapter"], run.ctx, tmp_path)
    (tmp_path / "adapter" / "stale.txt").write_text("left from an earlier run\n")
    package(["adapter"], run.ctx, tmp_path)
    assert not (tmp_path / "adapter" / "stale.txt").exists()
    assert verify_manifest(tmp_path / "adapter") == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_adapter_package_loads_back_to_the_trained_model(run):
    model = load_adapter_package(run.folders["adapter"])
    # the same packed weights, adapter tensors and kernels: equal, allowing one bf16 ulp at the logit scale
    atol = 2**-8 * run.trained_logits.abs().max().item()
    torch.testing.assert_close(_logits(model, run.ids), run.trained_logits, rtol=0, atol=atol)
    assert (run.folders["adapter"] / "plan.yaml").read_text() == run.ctx.plan_yaml


def test_the_merged_package_loads_with_plain_transformers_and_computes_the_trained_model(run):
    from transformers import AutoModelForCausalLM

    folder = run.folders["merged"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear
    merged = _logits(model, run.ids)
    difference = (merged - run.trained_logits).abs().max().item()
    effect = (run.trained_logits - run.base_logits).abs().max().item()
    scale = run.trained_logits.abs().max().item()
    # The merged model rounds W + ΔW to bf16 (relative error ≤ 2⁻⁹ per weight) and computes one bf16 matmul,
    # where the adapter path adds a bf16 x·W and the LoRA branch; each of the 4 layers and the lm_head can
    # differ by a few bf16 ulps (2⁻⁸ ≈ 0.4 % relative), so allow 8 ulps of the logit scale (≈ 3 %),
    # and require the difference to be far below what the adapter itself changes (so a merge that
    # dropped or doubled the adapter fails).
    assert difference <= 8 * 2**-8 * scale
    assert difference <= 0.2 * effect


def test_the_gptq_package_quantizes_every_module_to_its_planned_bits(run):
    folder = run.folders["gptq"]
    settings_for = plan_settings(run.plan)
    config = json.loads((folder / "quantize_config.json").read_text())
    assert config["dynamic"] == gptq_dynamic(run.spec, settings_for)
    modules = dict(load_quantized(folder).model.named_modules())
    for index, layer in enumerate(run.spec.layers):
        for module in layer:
            real = modules[run.spec.module_path(index, module)]
            planned = settings_for(index, module)
            assert (real.bits, real.group_size) == (planned.bits, planned.group_size), module.name
    assert modules["model.layers.2.self_attn.v_proj"].bits == 8


def test_the_onnx_package_computes_the_merged_model_in_fp32(run):
    import onnx
    import onnxruntime

    folder = run.folders["onnx"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["onnx"]["max_abs_logit_difference"] < 1e-3
    onnx.checker.check_model(str(folder / "model.onnx"))
    # again, on other tokens and a batch of two of another length: both axes are dynamic
    row = run.ctx.tokenizer("a short line of text, and another one here", return_tensors="pt").input_ids
    ids = row[:, : row.shape[1] // 2 * 2].reshape(2, -1)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = load_fp32(run.folders["merged"])(ids)
    assert (torch.from_numpy(logits) - expected).abs().max().item() < 1e-3


def test_every_package_measures_its_held_out_loss_in_its_own_runtime_against_the_trained_model(run):
    runtimes = {"adapter": "qra (gptqmodel + peft)", "merged": "transformers (bf16)", "gptq": "gptqmodel (TORCH, bf16)",
                "onnx": "onnxruntime (fp32)", "gguf": "llama.cpp"}
    records = {name: json.loads((folder / "manifest.json").read_text())["serving"] for name, folder in run.folders.items()}
    assert {name: record["runtime"] for name, record in records.items()} == runtimes
    for record in records.values():
        assert set(record["by_task"]) == {"text", "pairs"}
        assert record["held_out_loss"] > 0 and record["se"] > 0
    assert records["adapter"]["vs_trained"] == {"difference": 0.0, "se": 0.0}
    # the gptq format re-quantizes the merged model to 2-8 bits: the one format that moves the loss by design
    assert records["gptq"]["vs_trained"]["difference"] != 0.0


def test_the_gguf_package_is_the_trained_base_transcoded_exactly_plus_a_lora_adapter(run):
    import gguf
    from llama_cpp import Llama

    from qra.runtime.package.gguf import ADAPTER_FILE, MODEL_FILE, llama_cpp_logits, tensor_types

    folder = run.folders["gguf"]
    path, adapter = folder / MODEL_FILE, folder / ADAPTER_FILE
    types = tensor_types(path)
    Q = gguf.GGMLQuantizationType
    settings_for = plan_settings(run.plan)
    for index, layer in enumerate(run.spec.layers):
        for module in layer:
            bits = settings_for(index, module).bits
            assert types[f"blk.{index}.{GGUF_NAMES[module.name]}.weight"] == (Q.Q8_0 if bits == 8 else Q.Q4_0), (index, module.name)
    assert types["token_embd.weight"] == Q.BF16 and types["blk.0.attn_norm.weight"] == Q.F32
    adapter_tensors = {t.name: t for t in gguf.GGUFReader(str(adapter)).tensors}
    # ranks differ per module, as planned (layer 1's down_proj has its own)
    assert adapter_tensors["blk.1.ffn_down.weight.lora_a"].shape.tolist() == [256, 12]
    assert adapter_tensors["blk.1.attn_q.weight.lora_b"].shape.tolist() == [8, 128]
    assert (folder / "Modelfile").read_text() == f"FROM ./{MODEL_FILE}\nADAPTER ./{ADAPTER_FILE}\n"
    assert "--lora" in (folder / "README.md").read_text()

    # llama.cpp's logits with the adapter against the trained model's (bf16, in torch). The base weights are
    # the trained ones to the bit (tests/test_gguf_exact.py); what remains is arithmetic: llama.cpp rounds
    # activations to 8 bits inside its quantized dot products, torch computes in bf16. Without the adapter the
    # difference is what the adapter changes. Measured here: 0.011 with the adapter, 0.66 without it.
    ids = run.ctx.tokenizer(TEXT).input_ids
    trained = run.trained_logits[0].numpy()
    ours = llama_cpp_logits(path, ids, adapter)
    without = llama_cpp_logits(path, ids)
    assert np.abs(ours - trained).max() < 0.1 * np.abs(without - trained).max()
    assert np.corrcoef(ours.ravel(), trained.ravel())[0, 1] > 0.999
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["gguf"]["exact"] is True

    llm = Llama(model_path=str(path), lora_path=str(adapter), n_ctx=128, verbose=False)
    text = llm("Return the value", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert text.strip()


def test_a_gguf_mix_merges_and_re_quantizes_each_tensor_to_its_planned_type(run, tmp_path):
    import gguf

    from qra.runtime.package.gguf import MODEL_FILE, llama_cpp_logits, tensor_types
    from qra.runtime.package.gguf_mix import planned_type
    from test_gguf import fp32_logits

    folder = package(["merged", "gguf"], replace(run.ctx, gguf_mix="plan"), tmp_path)["gguf"]
    path = folder / MODEL_FILE
    types = tensor_types(path)
    settings_for = plan_settings(run.plan)
    for index, layer in enumerate(run.spec.layers):
        for module in layer:
            expected = planned_type(settings_for(index, module).bits, module.in_features)
            assert types[f"blk.{index}.{GGUF_NAMES[module.name]}.weight"] == expected, (index, module.name)
    Q = gguf.GGMLQuantizationType
    # rows of 128 take llama.cpp's 32-block fallbacks; down_proj's rows of 256 take the K-quants themselves
    assert types["blk.0.attn_q.weight"] == Q.Q4_0 and types["blk.0.ffn_down.weight"] == Q.Q2_K
    assert types["blk.2.attn_q.weight"] == Q.Q5_0 and types["blk.2.ffn_down.weight"] == Q.Q4_K
    assert types["blk.2.attn_v.weight"] == types["blk.3.attn_q.weight"] == Q.Q8_0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["gguf"]["exact"] is False and manifest["gguf"]["mix"] == "plan"
    assert manifest["gguf"]["tensor_types"] == {name: qtype.name for name, qtype in types.items()}
    assert manifest["serving"]["runtime"] == "llama.cpp" and "vs_trained" in manifest["serving"]
    assert (folder / "Modelfile").read_text() == f"FROM ./{MODEL_FILE}\n"

    # llama.cpp's logits against the merged model's (fp32). The file re-quantizes the merged weights with
    # llama.cpp's quantizers at 2-8 bits (the conversion itself is exact: tests/test_gguf.py), so they are not
    # equal. Measured here: correlation 0.982, mean |difference| 0.15 of the logits' spread. The bounds
    # leave room for another CPU's kernels but fail a file whose tensors went to the wrong place (correlation
    # of unrelated logits is about 0) or lost a layer.
    ids = run.ctx.tokenizer(TEXT).input_ids
    ours, reference = llama_cpp_logits(path, ids), fp32_logits(tmp_path / "merged", ids)
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > GGUF_LOGIT_CORRELATION
    assert np.abs(ours - reference).mean() < GGUF_MEAN_DIFFERENCE * reference.std()


def test_an_unknown_gguf_mix_or_a_mix_without_gguf_is_refused_before_anything_is_written(run, tmp_path):
    with pytest.raises(QraError, match="unknown --gguf-mix 'q4_z'"):
        package(["gguf"], replace(run.ctx, gguf_mix="q4_z"), tmp_path / "out")
    with pytest.raises(QraError, match="add gguf to --format"):
        package(["merged"], replace(run.ctx, gguf_mix="q8_0"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_is_one_line_naming_the_valid_ones(run, tmp_path):
    with pytest.raises(QraError) as error:
        package(["merged", "tflite"], run.ctx, tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message and "'tflite'" in message
    assert all(name in message for name in FORMATS)
    assert error.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_gptq_without_calibration_is_refused_before_anything_is_written(run, tmp_path):
    with pytest.raises(QraError, match="calibration"):
        package(["adapter", "gptq"], replace(run.ctx, calibration=[]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_for_an_architecture_llama_cpp_does_not_take_is_refused_before_anything_is_written(run, tmp_path):
    ctx = replace(run.ctx, spec=replace(run.spec, model_type="gpt_neox"))
    with pytest.raises(QraError) as error:
        package(["adapter", "gguf"], ctx, tmp_path / "out")
    assert "\n" not in str(error.value) and "'gpt_neox'" in str(error.value) and "another format" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_gguf_without_llama_cpp_python_says_how_to_install_it(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an import of a missing package raises
    with pytest.raises(QraError) as error:
        package(["gguf"], run.ctx, tmp_path / "out")
    assert "\n" not in str(error.value) and "pip install" in str(error.value) and "llama-cpp-python" in str(error.value)
    assert not (tmp_path / "out").exists()
