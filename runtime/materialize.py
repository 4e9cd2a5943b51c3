"""`qra materialize`: from a verified plan to a fine-tuned model packaged for serving.

Stages, each resumable (a finished stage leaves its folder under OUT/work and is skipped next time):
check the plan against the model → tokenize the data → GPTQ-quantize each module to its planned bits →
attach LoRA at each module's rank → train (memory measured on the first step, on any later batch no measured one
covers, and on the data's worst batch) → evaluate → package.

With a shared `cache` folder, the dequantized base and each quantization (keyed by the model, the bits and
group size of every module, and the calibration tokens) are kept there and reused by later runs, e.g. the
seeds of a benchmark or a rerun with another learning rate.
"""

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qra.errors import QraError
from qra.files import atomic_folder, digest, text_digest, write_text
from qra.models import ModelSource, content_hash, load_model, load_tokenizer
from qra.plans.io import dump_plan
from qra.plans.memory import plan_settings
from qra.plans.schema import Plan, Training
from qra.plans.spec import ModelSpec, resolve_spec
from qra.plans.verify import data_problem, for_data, model_problems
from qra.runtime.data import (
    Dataset,
    Example,
    Fields,
    Record,
    batch_source,
    batches,
    calibration_batches,
    calibration_sequences,
    exact_match,
    has_conversations,
    held_out_batches_by_task,
    load_dataset,
    pad_id,
    pads,
    require_chat_template,
    training_features,
    worst_batch,
)
from qra.runtime.footprint import memory_report
from qra.runtime.heldout import HELD_OUT_BATCH_SIZE, HeldOut, held_out_sums
from qra.runtime.quantize import GPTQModelWeights, gptqmodel_log_dir
from qra.runtime.run import StepLog, open_run
from qra.runtime.train import train_run

log = logging.getLogger(__name__)
MARKER = "qra-run.json"


@dataclass
class MaterializeRequest:
    plan: Plan
    output: Path
    data: str = "python-reference"
    held_out: str | None = None
    """A held-out file or saved folder of its own (`--held-out`); None: held out from `data`."""
    fields: Fields = field(default_factory=Fields)
    formats: list[str] = field(default_factory=lambda: ["adapter"])
    model: str | None = None
    resume: bool = False
    checkpoint_every: int = 25
    cache: Path | None = None
    exact_match_examples: int = 32
    data_seed: int | None = None
    """Seeds the data (generated sets, JSONL splits); None: the plan's training seed."""
    gguf_mix: str | None = None
    """The `gguf` format as one merged, re-quantized file by this mix (lossy); None: the exact base + adapter."""

    @property
    def seed_of_data(self) -> int:
        return self.plan.training.seed if self.data_seed is None else self.data_seed


def training_device(plan: Plan) -> str:
    """Where the fine-tune runs: the GPU where the plan targets one and there is one, else the CPU."""
    return "cuda" if plan.device.kind == "cuda" and torch.cuda.is_available() else "cpu"


def plan_digest(plan: Plan) -> str:
    """sha256 of the plan's YAML: the marker names the plan an output folder is a run of."""
    return text_digest(dump_plan(plan))


def _check_output(request: MaterializeRequest) -> None:
    """OUT must be new, empty, or a previous run of this very plan."""
    out = request.output
    if not out.exists():
        return
    if not out.is_dir():
        raise QraError(f"output {out} exists and is not a folder")
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("plan_digest") == plan_digest(request.plan):
        return
    if any(out.iterdir()):
        raise QraError(f"output folder {out} exists and is not a previous run of this plan: choose another -o")


def _model_for(request: MaterializeRequest) -> tuple[ModelSource, ModelSpec, PretrainedConfig]:
    source, spec, config = resolve_spec(request.model or request.plan.model.id, request.plan.training.seq_len)
    if not source.has_weights:
        raise QraError(f"model {source.name!r} is a config without weights: materialize needs the weights (--model)")
    problems = model_problems(request.plan, spec, content_hash(source))
    if problems:
        raise QraError(f"the plan is for another model: {problems[0]}")
    return source, spec, config


def _train_features(dataset: Dataset, tokenizer, seq_len: int) -> list:
    train = training_features(dataset.train, tokenizer, seq_len)
    if not train:
        raise QraError(f"data {dataset.name!r} gives no training sequence of {seq_len} tokens")
    return train


def _base_folder(source: ModelSource, work: Path) -> Path:
    """A Hugging Face folder for gptqmodel: the source itself, or the GGUF dequantized and saved once."""
    if source.kind == "folder":
        return source.path
    folder = work / "base"
    if not (folder / "config.json").is_file():
        model, tokenizer = load_model(source, "bfloat16")
        with atomic_folder(folder) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return folder


def quantization_key(source: ModelSource, spec: ModelSpec, plan: Plan, calibration: list[list[int]]) -> str:
    """What a quantization depends on: the weights, every module's bits and group size, the calibration tokens."""
    settings = plan_settings(plan)
    modules = [(i, m.name, settings(i, m).bits, settings(i, m).group_size) for i, layer in enumerate(spec.layers) for m in layer]
    record = {"model": content_hash(source) or source.name, "modules": modules, "calibration": calibration}
    return digest(record, 16)


def held_out_exact_match(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Record], limit: int = 32, max_new_tokens: int = 12
) -> float | None:
    """Share of the first `limit` held-out prompt/response examples answered exactly (greedy decoding);
    None for plain text and conversations."""
    answerable = [example for example in examples if isinstance(example, Example) and not example.is_text][:limit]
    if not answerable:
        return None
    model.eval()

    def generate(prompt: str) -> str:
        inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return exact_match(generate, answerable)


def held_out_by_task(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, training: Training, seed: int) -> HeldOut:
    """Every held-out sequence of each task, batched by the data's `seed` (not the training seed, so that
    runs of one plan with different seeds score the same set); a task whose held-out examples make no
    sequence is left out, with a warning."""
    by_task = held_out_batches_by_task(dataset, tokenizer, training.seq_len, HELD_OUT_BATCH_SIZE, seed)
    for task in [task for task, task_batches in by_task.items() if not task_batches]:
        log.warning("task %s has no held-out sequence of %d tokens: its held-out loss is not reported", task, training.seq_len)
        del by_task[task]
    return by_task


def check_request(request: MaterializeRequest) -> tuple[ModelSource, ModelSpec, Dataset]:
    """Everything `materialize` checks before it writes anything: formats, output folder, model, data (and,
    for conversations, that the model's tokenizer has a chat template)."""
    from qra.runtime.package import check_buildable, check_formats

    check_formats(request.formats)
    _check_output(request)
    source, spec, config = _model_for(request)
    check_buildable(request.formats, spec, config, plan_settings(request.plan), request.gguf_mix)
    dataset = load_dataset(request.data, request.held_out, request.seed_of_data, fields=request.fields)
    if has_conversations(dataset):
        require_chat_template(load_tokenizer(source))
    problem = data_problem(request.plan, spec, pads(dataset, request.plan.training.batch_size))
    if problem is not None:
        raise QraError(problem)
    return source, spec, dataset


def materialize(request: MaterializeRequest, on_step: Callable[[StepLog], None] | None = None) -> dict:
    """Run every stage; returns the results that are also written to OUT/results.json."""
    from qra.runtime.package import PackageContext, package

    plan, training = request.plan, request.plan.training
    source, spec, dataset = check_request(request)
    out, work = request.output, request.output / "work"
    shared = request.cache or work
    work.mkdir(parents=True, exist_ok=True)
    write_text(out / MARKER, json.dumps({"plan_digest": plan_digest(plan)}))
    log.info("preparing the base model %s", source.name)
    base = _base_folder(source, shared)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    train_features = _train_features(dataset, tokenizer, training.seq_len)
    calibration = calibration_sequences(train_features)
    log.info("quantizing to the plan's bits with gptqmodel (%d calibration sequences; its log: %s)",
             len(calibration), gptqmodel_log_dir())
    folder = shared / "quantized" / quantization_key(source, spec, plan, calibration) if request.cache else work / "quantized"
    device = training_device(plan)
    log.info("training on %s", device)
    weights = GPTQModelWeights(base, spec, calibration, folder, training.compute_dtype, training.dequantize_in_backward, device,
                               calibration_batches(train_features, training.batch_size, pad_id(tokenizer)))
    batch_for = batch_source(train_features, training.batch_size, training.grad_accumulation, training.seed, pad_id(tokenizer))
    held_out = held_out_by_task(dataset, tokenizer, training, request.seed_of_data)
    wall: dict[str, float] = {}
    began = time.perf_counter()
    with open_run(weights, spec, plan_settings(plan), training, batch_for, held_out) as run:
        wall["quantize"] = time.perf_counter() - began
        log.info("training %d steps on %d sequences of %d tokens", training.steps, len(train_features), training.seq_len)
        worst = worst_batch(batches(train_features, training.batch_size, training.seed, 0, pad_id(tokenizer)))
        result = train_run(run, work / "checkpoint", request.checkpoint_every, request.resume, on_step, worst_batch=worst)
        wall["train"] = result.wall_s
        adapter_folder = work / "adapter"
        run.model.save_pretrained(adapter_folder)
        trained_sums = held_out_sums(run.model, held_out)
        began = time.perf_counter()
        results = {
            "training": result.to_dict(),
            "data": dataset.name,
            "held_out_data": request.held_out,
            "held_out_by_task": result.held_out_by_task_after,
            "held_out_scores": result.scores_after,
            "exact_match": held_out_exact_match(run.model, tokenizer, dataset.held_out, request.exact_match_examples),
        }
        wall["evaluate"] = time.perf_counter() - began
    results["wall_s"] = wall
    if result.measured is not None:
        results["memory"] = memory_report(for_data(plan, pads(dataset, training.batch_size)), spec, result.measured)
    log.info("packaging: %s", ", ".join(request.formats))
    context = PackageContext(
        quantized=weights.quantized or base, adapter=adapter_folder, tokenizer=tokenizer, plan=plan,
        spec=spec, calibration=calibration, extra_manifest=results,
        source_gguf=source.path if source.kind == "gguf" else None, gguf_mix=request.gguf_mix,
        held_out=held_out, trained_sums=trained_sums,
    )
    results["packages"] = {name: str(path) for name, path in package(request.formats, context, out).items()}
    write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    return results
