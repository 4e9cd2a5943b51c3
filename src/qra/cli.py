"""The `qra` command line: thin wiring from typed options to the plans, compiler and runtime packages."""

import functools
import importlib.metadata
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO, TypeVar

import typer
from rich.console import Console

from qra.errors import QraError
from qra.units import format_bytes, format_seconds, parse_bytes

F = TypeVar("F", bound=Callable)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
plan_app = typer.Typer(help="Inspect, check and compare plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")

ModelOption = Annotated[str, typer.Option("--model", "-m", help="local folder, .gguf, config.json, alias (smollm2-135m, llama-3-8b, qwen2.5-7b, mistral-7b) or hub id")]
DATA_HELP = ("a .jsonl, .json, .csv or .parquet file or a datasets.save_to_disk folder, each record text, prompt/response "
             "or chat messages; or python-reference / arithmetic; or several joined by +")
HeldOutOption = Annotated[str | None, typer.Option(
    "--held-out", help="held-out file or saved folder of your own, in any --data format: scored instead of a part of --data")]
TextFieldOption = Annotated[str, typer.Option("--text-field", help="the field (column) of --data and --held-out that holds plain text")]
MessagesFieldOption = Annotated[str, typer.Option(
    "--messages-field", help="the field (column) of --data and --held-out that holds chat messages")]
LoraInitOption = Annotated[str, typer.Option(
    "--lora-init", help="where each adapter starts: zeros (QLoRA), residual (the quantization error's rank-r SVD, LoftQ) or "
    "calibrated (its rank-r correction on the calibration inputs' outputs, CLoQ)")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"qra {importlib.metadata.version('qra')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print qra's version and exit")] = False,
) -> None:
    """qra fine-tunes a language model within a memory budget: compile picks each layer's GPTQ bits and LoRA
    rank, materialize quantizes, fine-tunes and packages the model."""


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # transformers imports torchao, which logs "Failed to load ..." for its optional CUDA kernels and makes torch
    # warn about its Enum registrations: noise on every command's stderr, around the one line an error should be.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Writes each message to `sys.stderr` as it is then, not as it was when the handler was made, so it never
    holds a stream that was swapped out and closed since (a test runner's captured stderr, a redirect)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def _log_progress(level: int = logging.INFO) -> None:
    """Stage messages of long commands (at `level` and above) go to stderr, one line each; gptqmodel's
    import banner (peft imports it), and the INFO messages of libraries that its import sets the root logger
    to pass on, go to its log instead of the terminal."""
    from qra.runtime.quantize import quiet_gptqmodel

    with quiet_gptqmodel():
        import gptqmodel  # noqa: F401

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("qra")
    logger.handlers = [handler]
    logger.setLevel(level)
    logger.propagate = False


def user_errors(command: F) -> F:
    """Turn a QraError into one line on stderr and its exit status; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except QraError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper


def _lora_init(name: str) -> str:
    from typing import get_args

    from qra.plans.schema import LoraInit

    if name not in get_args(LoraInit):
        raise QraError(f"--lora-init must be one of {', '.join(get_args(LoraInit))} (got {name!r})")
    return name


def _training(seq_len: int, batch_size: int, grad_checkpointing: bool, compute_dtype: str):
    from pydantic import ValidationError

    from qra.plans.schema import Training

    try:
        return Training(seq_len=seq_len, batch_size=batch_size, gradient_checkpointing=grad_checkpointing, compute_dtype=compute_dtype)
    except ValidationError as error:
        first = error.errors()[0]
        raise QraError(f"--{first['loc'][0].replace('_', '-')}: {first['msg'].lower()} (got {first['input']!r})") from None


def _device(device: str, context: str):
    from qra.plans.schema import Device

    if device not in ("cuda", "cpu"):
        raise QraError(f"--device must be cuda or cpu (got {device!r})")
    return Device(kind=device, context_bytes=parse_bytes(context, "--context") if context != "0" else 0)


def _check_bits_rank(bits: int, rank: int, group_size: int) -> None:
    from qra.plans.schema import ALLOWED_BITS, GROUP_SIZES

    if bits not in ALLOWED_BITS:
        raise QraError(f"--bits {bits} is not supported: choose one of {', '.join(map(str, ALLOWED_BITS))}")
    if rank < 1:
        raise QraError(f"--rank {rank} must be a positive integer")
    if group_size not in GROUP_SIZES:
        raise QraError(f"--group-size {group_size} is not supported: choose one of {', '.join(map(str, GROUP_SIZES))}")


@app.command()
@user_errors
def estimate(
    model: ModelOption = "smollm2-135m",
    bits: Annotated[int | None, typer.Option(help="uniform bits per weight: 2, 3, 4, 8, or 16 (unquantized)")] = None,
    rank: Annotated[int | None, typer.Option(help="uniform LoRA rank")] = None,
    group_size: Annotated[int, typer.Option(help="GPTQ group size (-1: one group per row)")] = 128,
    plan: Annotated[Path | None, typer.Option(help="estimate this plan instead of uniform --bits/--rank")] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per micro-batch")] = 4,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing")] = False,
    compute_dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cuda or cpu: the device the estimate is for")] = "cuda",
    context: Annotated[str, typer.Option(help="fixed overhead of the device context, e.g. 500MB (0 on CPU)")] = "500MB",
    budget: Annotated[str | None, typer.Option(help="say whether the estimate fits, e.g. 8GB")] = None,
    data: Annotated[str | None, typer.Option(
        help="estimate for this data's worst batch (prompt/response and chat data pad batches): " + DATA_HELP)] = None,
    held_out: HeldOutOption = None,
    text_field: TextFieldOption = "text",
    messages_field: MessagesFieldOption = "messages",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object: total_bytes and each component, in bytes")] = False,
) -> None:
    """Estimate the peak memory of fine-tuning MODEL at uniform --bits/--rank, or under --plan."""
    from qra.plans.io import load_plan
    from qra.plans.memory import estimate_memory, estimate_plan, uniform_settings
    from qra.plans.report import memory_table
    from qra.plans.spec import resolve_spec
    from qra.plans.verify import for_data

    budget_bytes = parse_bytes(budget) if budget is not None else None
    fields = _fields(text_field, messages_field)
    if held_out is not None and data is None:
        raise QraError("--held-out goes with --data: give the data it is held out from")
    if plan is not None:
        loaded = load_plan(plan)
        source, spec, _ = resolve_spec(model, loaded.training.seq_len)
        if spec.num_layers != len(loaded.layers):
            raise QraError(f"the plan has {len(loaded.layers)} layers but model {model!r} has {spec.num_layers}")
        if data is not None:
            loaded = for_data(loaded, _data_pads(data, loaded.training.batch_size, held_out, fields))
        result = estimate_plan(spec, loaded)
        budget_bytes = budget_bytes or loaded.budget.bytes
    else:
        if bits is None or rank is None:
            raise QraError("give --bits and --rank for a uniform estimate, or --plan PLAN")
        _check_bits_rank(bits, rank, group_size)
        training = _training(seq_len, batch_size, grad_checkpointing, compute_dtype)
        if data is not None:
            training = training.model_copy(update={"padded_batches": _data_pads(data, batch_size, held_out, fields)})
        source, spec, _ = resolve_spec(model, seq_len)
        result = estimate_memory(spec, uniform_settings(bits, rank, group_size), training, _device(device, context))
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    console = Console()
    console.print(f"{spec.architecture} ({source.name}), {spec.num_layers} layers, {spec.parameter_count / 1e9:.2f}B parameters")
    console.print(memory_table(result.components, budget_bytes))
    if budget_bytes is not None and result.total_bytes > budget_bytes:
        console.print(f"does not fit: {format_bytes(result.total_bytes - budget_bytes)} over the budget")
        raise typer.Exit(1)


@plan_app.command("new")
@user_errors
def plan_new(
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the plan (YAML)")],
    budget: Annotated[str, typer.Option(help="memory budget, e.g. 8GB, 8GiB, 300MB")],
    bits: Annotated[int, typer.Option(help="bits for every layer: 2, 3, 4, 8 or 16")] = 4,
    rank: Annotated[int, typer.Option(help="LoRA rank for every layer")] = 8,
    group_size: Annotated[int, typer.Option(help="GPTQ group size")] = 128,
    model: ModelOption = "smollm2-135m",
    seq_len: Annotated[int, typer.Option()] = 256,
    batch_size: Annotated[int, typer.Option()] = 4,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing")] = False,
    compute_dtype: Annotated[str, typer.Option()] = "bfloat16",
    steps: Annotated[int, typer.Option(help="optimizer steps of the fine-tune")] = 100,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate (warmup, then cosine decay)")] = 2e-4,
    max_grad_norm: Annotated[float, typer.Option(help="clip each step's gradient to this global L2 norm (0: no clipping)")] = 1.0,
    data: Annotated[str | None, typer.Option(
        help="the data the plan will train on: its worst batch sets the estimate (prompt/response and chat data pad batches): "
        + DATA_HELP)] = None,
    text_field: TextFieldOption = "text",
    messages_field: MessagesFieldOption = "messages",
    lora_init: LoraInitOption = "zeros",
) -> None:
    """Write a uniform plan (every layer the same bits and rank), the QLoRA-style baseline."""
    from qra.models import content_hash
    from qra.plans.build import model_ref, uniform_plan
    from qra.plans.io import save_plan
    from qra.plans.schema import Budget
    from qra.plans.spec import resolve_spec

    budget_bytes = parse_bytes(budget)
    _check_bits_rank(bits, rank, group_size)
    training = _training(seq_len, batch_size, grad_checkpointing, compute_dtype)
    if steps < 1 or learning_rate <= 0 or max_grad_norm < 0:
        raise QraError("--steps and --learning-rate must be positive, --max-grad-norm at least 0")
    training = training.model_copy(update={"steps": steps, "learning_rate": learning_rate, "max_grad_norm": max_grad_norm or None,
                                           "lora_init": _lora_init(lora_init)})
    if data is not None:
        training = training.model_copy(update={"padded_batches": _data_pads(data, batch_size, fields=_fields(text_field, messages_field))})
    source, spec, _ = resolve_spec(model, seq_len)
    plan = uniform_plan(
        spec, model_ref(spec, source.name, content_hash(source)), Budget(bytes=budget_bytes, text=budget),
        bits, rank, group_size, training=training,
    )
    save_plan(plan, output)
    fits = "fits" if plan.memory.headroom_bytes >= 0 else "does NOT fit"
    typer.echo(f"wrote {output}: estimated peak {format_bytes(plan.memory.total_bytes)} {fits} in {budget}")


def _fields(text_field: str, messages_field: str):
    from qra.runtime.data import Fields

    if not text_field or not messages_field or text_field == messages_field:
        raise QraError(f"--text-field and --messages-field must be two different names (got {text_field!r} and {messages_field!r})")
    return Fields(text=text_field, messages=messages_field)


def _data_pads(data: str, batch_size: int, held_out: str | None = None, fields=None) -> bool:
    """Whether the data's training batches pad (`qra.runtime.data.pads`); the data (and held-out set) are
    read whole, so bad input is refused here."""
    from qra.runtime.data import Fields, load_dataset, pads

    return pads(load_dataset(data, held_out, fields=fields or Fields()), batch_size)


def _spec_of_plan(plan, model: str | None):
    """The plan's model spec and content hash: from --model, else from the plan's own model id if it resolves."""
    from qra.models import content_hash
    from qra.plans.spec import resolve_spec

    if model is None:
        # The recorded id may be a path that is gone; one that looks like a hub id (`models/tiny`) resolves
        # but then cannot be loaded, so the whole load is what decides whether the plan's model can be found.
        try:
            source, spec, _ = resolve_spec(plan.model.id)
        except QraError:
            return None, None
    else:
        source, spec, _ = resolve_spec(model)
    return spec, content_hash(source)


@plan_app.command("show")
@user_errors
def plan_show(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="plan YAML")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="model to size the layers with (default: the plan's)")] = None,
    plot: Annotated[Path | None, typer.Option(help="also write bits and rank by layer as a PNG here")] = None,
) -> None:
    """Per-layer table (bits, rank, bytes), totals, the memory estimate, and the bits/rank pattern."""
    from qra.plans.io import load_plan
    from qra.plans.plot import bits_rank_pattern, plot_plan
    from qra.plans.report import memory_table, plan_table

    plan = load_plan(plan_path)
    spec, _ = _spec_of_plan(plan, model)
    if plot is not None and not plot.parent.is_dir():
        raise QraError(f"--plot {plot}: folder {plot.parent} does not exist")
    console = Console()
    console.print(f"{plan_path}: {plan.model.id} ({plan.model.architecture}), budget {plan.budget.text}, strategy {plan.provenance.strategy}")
    console.print(plan_table(plan, spec))
    if plan.memory is not None:
        console.print(memory_table(plan.memory.components, plan.budget.bytes))
    if spec is not None:
        console.print(bits_rank_pattern(plan, spec).describe())
    if plot is not None:
        if spec is None:
            raise QraError("--plot needs the model's layer shapes: pass --model (a config, folder or alias)")
        plot_plan(plan, spec, plot)
        console.print(f"wrote {plot}")


@plan_app.command("verify")
@user_errors
def plan_verify(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="plan YAML")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="check against this model (default: the plan's, if it can be found)")] = None,
    data: Annotated[str | None, typer.Option(
        help="check the plan for this data's worst batch (padded batches hold more): " + DATA_HELP)] = None,
    text_field: TextFieldOption = "text",
    messages_field: MessagesFieldOption = "messages",
) -> None:
    """Exit 0 when the plan is verified; 1 when over budget or the model's fingerprint does not match;
    2 when the plan is unreadable or invalid."""
    from qra.plans.io import load_plan
    from qra.plans.verify import verify_plan

    plan = load_plan(plan_path)
    spec, weights_hash = _spec_of_plan(plan, model)
    padded = _data_pads(data, plan.training.batch_size, fields=_fields(text_field, messages_field)) if data is not None else None
    if padded and spec is None:
        raise QraError("--data needs the model's shapes to re-estimate: pass --model (a config, folder or alias)")
    verdict = verify_plan(plan, spec, weights_hash, padded)
    if padded and not plan.training.padded_batches:
        typer.echo(f"note: the plan was made for batches without padding; {data} pads them, and the estimate below is for that")
    how = "recomputed from the model" if verdict.recomputed else "as recorded in the plan (model not available)"
    for problem in verdict.problems:
        typer.echo(f"not verified: {problem}", err=True)
    if not verdict.verified:
        raise typer.Exit(1)
    typer.echo(
        f"verified: estimated peak {format_bytes(verdict.total_bytes)} within budget {plan.budget.text} "
        f"({format_bytes(verdict.budget_bytes - verdict.total_bytes)} headroom), {how}"
    )


@plan_app.command("diff")
@user_errors
def plan_diff(
    first: Annotated[Path, typer.Argument(metavar="A")],
    second: Annotated[Path, typer.Argument(metavar="B")],
) -> None:
    """What differs between two plans (exit 0 either way)."""
    from qra.plans.io import load_plan
    from qra.plans.report import plan_diff as diff_lines

    lines = diff_lines(load_plan(first), load_plan(second))
    typer.echo("\n".join(lines) if lines else "the plans are the same")


@app.command()
@user_errors
def materialize(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="plan YAML")],
    output: Annotated[Path, typer.Option("--output", "-o", help="run folder: work files, packages, results.json")],
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "python-reference",
    held_out: HeldOutOption = None,
    text_field: TextFieldOption = "text",
    messages_field: MessagesFieldOption = "messages",
    formats: Annotated[str, typer.Option("--format", help="comma-separated: adapter, merged, gptq, onnx, gguf")] = "adapter",
    gguf_mix: Annotated[str | None, typer.Option("--gguf-mix", help="gguf as one merged file re-quantized by llama.cpp (lossy): plan, q4_k_m, q8_0, ...; default: the exact base + adapter")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="the model's weights (default: the plan's model id)")] = None,
    resume: Annotated[bool, typer.Option(help="continue a previous run of this plan in OUTPUT")] = False,
    check: Annotated[bool, typer.Option("--check", help="only check that the plan, model, data and formats are accepted; write nothing")] = False,
) -> None:
    """Quantize each module to its planned bits, attach LoRA at each rank, fine-tune, and package."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from qra.plans.io import load_plan
    from qra.runtime.materialize import MaterializeRequest, check_request, materialize as run

    plan = load_plan(plan_path)
    _log_progress()
    request = MaterializeRequest(
        plan=plan, output=output, data=data, held_out=held_out, fields=_fields(text_field, messages_field),
        formats=[f.strip() for f in formats.split(",") if f.strip()],
        model=model, resume=resume, gguf_mix=gguf_mix,
    )
    if check:
        source, _, dataset = check_request(request)
        typer.echo(
            f"accepted: {plan_path} matches {source.name}; {len(plan.layers)} layers, {plan.training.steps} steps on "
            f"{dataset.name} ({len(dataset.train)} examples, {len(dataset.held_out)} held out); "
            f"formats {', '.join(request.formats)}; output {output}"
        )
        return
    columns = (TextColumn("training"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[rate]:.0f} tok/s"), TimeRemainingColumn())
    progress = Progress(*columns, console=Console(stderr=True))
    task = progress.add_task("train", total=plan.training.steps, loss=float("nan"), rate=0.0)

    def show(log) -> None:
        progress.start()  # only once training runs: input errors before it stay one line
        progress.update(task, completed=log.step, loss=log.loss, rate=log.tokens_per_s)

    try:
        results = run(request, on_step=show)
    finally:
        progress.stop()
    training = results["training"]
    before, after = training["held_out_loss_before"], training["held_out_loss_after"]
    tasks = results.get("held_out_by_task") or {}
    scored = f"held-out loss (the mean of {len(tasks)} tasks' own)" if len(tasks) > 1 else "held-out loss"
    if after is None:
        typer.echo("held-out loss: none (the data has no held-out sequence of the plan's seq_len)")
    else:
        typer.echo(f"{scored} {'(resumed)' if before is None else f'{before:.4f}'} -> {after:.4f}")
    if len(tasks) > 1:
        typer.echo("  after: " + ", ".join(f"{task} {loss:.4f}" for task, loss in tasks.items()))
    if results.get("exact_match") is not None:
        typer.echo(f"held-out exact match {results['exact_match']:.1%}")
    memory = results.get("memory")
    if memory is not None:
        typer.echo(
            f"memory: estimated {format_bytes(memory['estimated_persistent_bytes'])} persistent, measured "
            f"{format_bytes(memory['measured_persistent_bytes'])} ({memory['persistent_error']:+.1%}); "
            f"peak {format_bytes(memory['measured_peak_bytes'])} of budget {plan.budget.text}"
        )
        if not memory["within_budget"]:
            typer.echo(f"error: the measured peak exceeds the plan's budget of {plan.budget.text}", err=True)
            raise typer.Exit(1)
    for name, path in results["packages"].items():
        typer.echo(f"{name}: {path}")


def _compile_with_bar(request, clock, console: Console):
    """The compile with one live progress bar on a terminal: stage, done/total, scores, the compile's ETA."""
    from rich.progress import BarColumn, Progress, TextColumn

    from qra.compiler.compile import compile_plan
    from qra.compiler.progress import StageProgress

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[scores]}"), TextColumn("{task.fields[eta]}"))
    progress = Progress(*columns, console=console)
    tasks: list = []  # the one task, added (and the display started) at the first report
    known: dict[str, float] = {}

    def show(stage: StageProgress) -> None:
        if not tasks:
            progress.start()
            tasks.append(progress.add_task(stage.stage, total=1, scores="", eta=""))
        clock.update(stage)
        known.update({name: value for name, value in (("best", stage.best), ("uniform", stage.uniform)) if value is not None})
        left = clock.seconds_left()
        progress.update(
            tasks[0], description=stage.stage, completed=stage.done, total=max(stage.total, 1),
            scores=", ".join(f"{name} {value:.4f}" for name, value in known.items()),
            eta="" if left is None else f"compile ETA {format_seconds(left)}",
        )

    try:
        return compile_plan(request, on_stage=show)
    finally:
        progress.stop()


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise QraError(f"{option} takes comma-separated integers, e.g. 2,3,4,8 (got {text!r})") from None
    if not values:
        raise QraError(f"{option} is empty")
    return values


@app.command("compile")
@user_errors
def compile_command(
    budget: Annotated[str, typer.Option(help="memory budget of the fine-tune, e.g. 8GB, 8GiB, 300MB")],
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the plan (YAML)")],
    model: ModelOption = "smollm2-135m",
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "python-reference",
    held_out: HeldOutOption = None,
    text_field: TextFieldOption = "text",
    messages_field: MessagesFieldOption = "messages",
    bits: Annotated[str, typer.Option(help="bit-widths to choose from")] = "2,3,4,8",
    ranks: Annotated[str, typer.Option(help="LoRA ranks to choose from")] = "4,8,16,32",
    granularity: Annotated[str | None, typer.Option(help="layer: one gene per layer; module: one per linear module (default: the effort's: layer for quick, module for standard and thorough)")] = None,
    effort: Annotated[str, typer.Option(help="quick, standard or thorough")] = "quick",
    strategy: Annotated[str, typer.Option(help="autoqra, or a baseline/ablation: uniform, sequential, heuristic, llamacpp (module granularity), random, bo, evolution")] = "autoqra",
    seed: Annotated[int, typer.Option()] = 0,
    journal: Annotated[Path | None, typer.Option(help="evaluation journal (default: OUTPUT.journal.jsonl)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the compile recorded in the journal")] = False,
    work: Annotated[Path | None, typer.Option(help="folder for the quantization cache and the priors, reusable across budgets (default: OUTPUT.work)")] = None,
    seq_len: Annotated[int, typer.Option()] = 256,
    batch_size: Annotated[int, typer.Option()] = 4,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing")] = False,
    steps: Annotated[int, typer.Option(help="optimizer steps of the plan's fine-tune: every candidate is scored on this schedule")] = 100,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate of the plan's fine-tune (warmup, then cosine decay)")] = 2e-4,
    max_grad_norm: Annotated[float, typer.Option(help="clip each step's gradient to this global L2 norm (0: no clipping)")] = 1.0,
    device: Annotated[str, typer.Option(help="cuda or cpu: the device the budget is for")] = "cuda",
    context: Annotated[str, typer.Option(help="fixed overhead of the device context")] = "500MB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display (errors and the final line only)")] = False,
    workers: Annotated[int, typer.Option(help="run candidates on a local Ray cluster with this many workers (0: in this process)")] = 0,
    ray_address: Annotated[str | None, typer.Option(help="run candidates on the Ray cluster at this address (e.g. auto, or HOST:6379)")] = None,
    lora_init: LoraInitOption = "zeros",
) -> None:
    """Search per-layer bits and LoRA ranks that fit BUDGET and fine-tune best; write a verified plan."""
    from qra.compiler.compile import EFFORTS, CompileRequest, compile_plan
    from qra.compiler.finalists import MARGIN_SE
    from qra.compiler.progress import CompileClock, StageLines
    from qra.plans.io import save_plan
    from qra.plans.schema import Budget

    if granularity not in (None, "layer", "module"):
        raise QraError(f"--granularity must be layer or module (got {granularity!r})")
    bit_choices, rank_choices = _int_list(bits, "--bits"), _int_list(ranks, "--ranks")
    for b in bit_choices:
        _check_bits_rank(b, 1, 128)
    for r in rank_choices:
        _check_bits_rank(16, r, 128)
    if steps < 1 or learning_rate <= 0 or seed < 0 or max_grad_norm < 0:
        raise QraError("--steps and --learning-rate must be positive, --seed and --max-grad-norm at least 0")
    if workers < 0:
        raise QraError(f"--workers must be 0 (everything in this process) or more, got {workers}")
    if (workers or ray_address) and importlib.util.find_spec("ray") is None:
        raise QraError("--workers and --ray-address need Ray: pip install -c constraints.txt ray")
    training = _training(seq_len, batch_size, grad_checkpointing, "bfloat16").model_copy(
        update={"steps": steps, "learning_rate": learning_rate, "seed": seed, "max_grad_norm": max_grad_norm or None,
                "lora_init": _lora_init(lora_init)})
    journal = journal or output.with_name(output.name + ".journal.jsonl")
    request = CompileRequest(
        model=model, budget=Budget(bytes=parse_bytes(budget), text=budget), data=data, bits=bit_choices, ranks=rank_choices,
        granularity=granularity, effort=effort, strategy=strategy, training=training, device=_device(device, context),
        journal=journal, work=work or output.with_name(output.name + ".work"), resume=resume,
        workers=workers, ray_address=ray_address, held_out=held_out, fields=_fields(text_field, messages_field),
    )
    if effort not in EFFORTS:
        raise QraError(f"--effort {effort!r} is not one of {', '.join(EFFORTS)}")
    effort_settings = EFFORTS[effort]
    clock = CompileClock(search_total=effort_settings.evaluations,
                         final_total=(effort_settings.finalists + 1) * effort_settings.seeds)
    console = Console(stderr=True)
    # on a terminal, the stage messages scroll above the bar; in a log or a pipe, one line per stage and warnings
    _log_progress(logging.INFO if console.is_terminal and not quiet else logging.WARNING)
    if quiet:
        outcome = compile_plan(request)
    elif console.is_terminal:
        outcome = _compile_with_bar(request, clock, console)
    else:
        lines = StageLines(lambda line: typer.echo(line, err=True), clock)
        try:
            outcome = compile_plan(request, on_stage=lines)
        finally:
            lines.close()
    save_plan(outcome.plan, output)
    plan = outcome.plan
    uniform, *finalists = plan.provenance.finalists
    uniform_mean = sum(uniform.scores.values()) / len(uniform.scores)
    winners = [f for f in finalists if f.paired_difference < -MARGIN_SE * f.paired_se]
    verdict = (f"the plan beats it by {-min(f.paired_difference for f in winners):.4f} (paired over {len(uniform.scores)} seeds)"
               if winners else f"no finalist beat it by more than {MARGIN_SE:g} paired SE: the plan is uniform")
    typer.echo(
        f"wrote {output}: predicted held-out loss {plan.predicted.score:.4f} ({plan.predicted.fidelity}); "
        f"{uniform.name}: {uniform_mean:.4f}; {verdict}; "
        f"estimated peak {format_bytes(plan.memory.total_bytes)} of {budget}; {plan.provenance.evaluations} evaluations"
    )
