"""The GGUF writer and llama.cpp's type rules, on tiny models: the BF16 file qra writes computes the model
itself in llama.cpp, and each planned bit-width maps to the type llama.cpp gives a tensor of that shape."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from qra.runtime.package.gguf import bf16_gguf, llama_cpp_logits, model_logits, tensor_types
from qra.runtime.package.gguf_mix import planned_type
from qra.testing import tiny_config, tiny_tokenizer

Q = gguf.GGMLQuantizationType
TEXT = "Return the value of the attribute, or raise an exception when the name is not defined."


# Llama 3.1's rotary scaling, with an original context short enough that the test's positions feel it
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def fp32_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """The saved model's logits computed in fp32: the reference llama.cpp's are held to."""
    return model_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)


def _model_folder(folder: Path, family: str) -> Path:
    """A tiny bf16 model whose weights are large enough (init std 0.1) for attention to be sharp, so that
    rotary positions decide the logits: a q/k layout or frequency llama.cpp does not expect changes them
    beyond the bound. `llama3` is Llama with Llama 3.1's rotary scaling."""
    torch.manual_seed(0)
    config = tiny_config("llama" if family == "llama3" else family, layers=2)
    config.initializer_range = 0.1
    if family == "llama3":
        config.rope_parameters = dict(LLAMA3_ROPE)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama3"])
def test_the_bf16_gguf_computes_the_model_in_llama_cpp(tmp_path, family):
    folder = _model_folder(tmp_path / "model", family)
    tokenizer = tiny_tokenizer()
    written = bf16_gguf(folder, tokenizer, tmp_path / "model.gguf", "tiny", None)
    assert written.architecture == ("llama" if family == "llama3" else family)
    assert ("rope_freqs.weight" in tensor_types(written.path)) == (family == "llama3")
    types = tensor_types(written.path)
    assert types["blk.0.attn_q.weight"] == Q.BF16 and types["blk.0.attn_norm.weight"] == Q.F32
    ids = tokenizer(TEXT).input_ids
    ours, reference = llama_cpp_logits(written.path, ids), fp32_logits(folder, ids)
    # The weights are the same bf16 numbers; llama.cpp and torch differ only in how they round activations.
    # Measured: the largest difference 3-4% of the logits' spread. Without llama's rotary permutation of
    # q/k it is about 400% (correlation 0.65); without Llama 3.1's frequency factors, about 470% (correlation 0.66).
    assert np.abs(ours - reference).max() < 0.1 * reference.std()
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.999


def test_gguf_types_follow_llama_cpp_s_fallback_for_rows_k_quants_do_not_fit():
    assert [planned_type(bits, 1536) for bits in (16, 8, 4, 3, 2)] == [Q.BF16, Q.Q8_0, Q.Q4_K, Q.Q3_K, Q.Q2_K]
    assert [planned_type(bits, 576) for bits in (16, 8, 4, 3, 2)] == [Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_0]
    assert planned_type(4, 100) == Q.F16


@pytest.mark.slow
def test_smollm2_as_gguf_tokenizes_computes_and_answers_as_the_source_model(tmp_path):
    """SmolLM2 (given as a GGUF, so its tokenizer is copied key for key) written as BF16 and typed as a uniform
    4-bit plan: q/k/v/o/gate/up (rows of 576) fall back to Q5_0, down_proj (rows of 1536) is Q4_K."""
    from qra.models import load_config, load_model, resolve_model
    from qra.plans.memory import uniform_settings
    from qra.plans.spec import spec_from_config
    from qra.runtime.package.gguf_mix import BASE_FILE_TYPE, planned_types, quantize

    source = resolve_model("smollm2-135m")
    spec = spec_from_config(load_config(source))
    model, tokenizer = load_model(source, "bfloat16")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    written = bf16_gguf(tmp_path / "model", tokenizer, tmp_path / "bf16.gguf", "smollm2", source.path)
    planned = planned_types(spec, uniform_settings(4, 8), written)
    quantize(written.path, tmp_path / "plan.gguf", BASE_FILE_TYPE[4], {name: qtype for name, (_, qtype) in planned.items()})
    types = tensor_types(tmp_path / "plan.gguf")
    assert all(types[name] == qtype for name, (_, qtype) in planned.items())
    assert types["blk.7.attn_q.weight"] == Q.Q5_0 and types["blk.7.ffn_down.weight"] == Q.Q4_K

    from llama_cpp import Llama

    llm = Llama(model_path=str(tmp_path / "plan.gguf"), n_ctx=128, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == tokenizer(TEXT).input_ids
    answer = llm("The capital of France is", max_tokens=3, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert "Paris" in answer
    ids = tokenizer(TEXT).input_ids
    ours, reference = llama_cpp_logits(written.path, ids), fp32_logits(tmp_path / "model", ids)
    assert np.abs(ours - reference).max() < 0.1 * reference.std()


def test_a_rotary_scaling_llama_cpp_is_not_given_is_refused_before_any_training():
    from qra.errors import QraError
    from qra.plans.spec import spec_from_config
    from qra.runtime.package import check_buildable

    config = tiny_config("llama", layers=2)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(QraError, match="'yarn' scaling: package another format"):
        check_buildable(["adapter", "gguf"], spec_from_config(tiny_config("llama", layers=2)), config)
