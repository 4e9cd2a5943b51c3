"""`qra compile`: the orchestrator that turns a model, a budget and data into a verified plan.

Stages (AutoQRA): budget bounds → quantization cache → importance priors → search (the chosen strategy,
ask/tell, every evaluation journaled) → the final comparison of the best finalists with the best uniform
configuration at the same budget, on fresh seeds, paired → the plan, verified by the memory model and
written atomically. A rerun with `--resume` replays the journal and the priors record and ends at the same
plan as an uninterrupted run with the same seed.
"""

import functools
import importlib.metadata
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from qra.compiler.bitscreen import BitScreen, screen_bits
from qra.compiler.fidelity import FidelityEvaluator, FidelityLadder, ladder_for, prepare_data
from qra.compiler.finalists import FinalPick, final_pick
from qra.compiler.importance import Importance, flat_importance
from qra.compiler.journal import Journal, JournaledPool
from qra.compiler.pool import Outcome, Pool, Task, open_pool
from qra.compiler.priors import PriorSettings, journal_path, measure_priors, probed_ranks
from qra.compiler.progress import StageProgress
from qra.compiler.qcache import QuantCache
from qra.compiler.space import Config, Granularity, SearchSpace, build_space, config_key
from qra.compiler.strategies import BASELINES, STRATEGIES, AutoQRA, Baseline, Evaluation, Problem, SearchResult, run_search, uniform_config
from qra.errors import QraError
from qra.files import content_digest, digest
from qra.models import ModelSource, content_hash, load_model, load_tokenizer
from qra.plans.build import model_ref, with_memory
from qra.plans.schema import Budget, Device, Plan, Prediction, Provenance, SeedScores, Training
from qra.plans.spec import ModelSpec, resolve_spec
from qra.plans.verify import verify_plan
from qra.runtime.data import Dataset, Fields, calibration_batches, has_conversations, load_dataset, require_chat_template, training_for
from qra.runtime.precision import fastest_dtype
from qra.units import format_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)
VERSIONED = ("qra", "torch", "transformers", "peft", "gptqmodel", "scikit-optimize")
PRIORS_STRATEGIES = ("autoqra", "sequential", "heuristic")


@dataclass(frozen=True)
class Effort:
    """How much a compile spends: evaluations of the search; the rungs of the fidelity ladder (fractions
    of the plan's own schedule, whose last step is the top rung unless `max_steps` caps it); the priors'
    probe steps and held-out sequences per task; the final paired comparison: how many finalists, on how
    many fresh seeds; and the granularity a request that names none gets. Quick stays at layer
    granularity: module granularity measures priors for seven times the units. Standard and thorough
    search modules, which beat layers at B2 by 0.030 ± 0.006 and tied them at B1 (docs/objective.md,
    "Granularity"). `evolution_share` is AutoQRA's share of the evaluations for its first stage. Quick's
    search is the evolution's warm-started population of eight, scored at step 0 and no further (r13): its two
    best mixed configurations go to the final comparison, in the order of the priors, since step 0 cannot see
    rank. In the shipped quick compiles (r10-r12) a screen rung at step 10 cost 1.2 fine-tunes, passed on the
    same two finalists step 0 ranks best, and put first the rank-heavy one, which lost; the refinement's
    proposals never became a quick plan (docs/objective.md, "The quick effort's search").
    `prior_end_ranks_only`: the priors probe the smallest and the largest rank only (quick, whose 6-step
    probes never found a middle rank gaining more than the smallest on SmolLM2). Standard's refinement has
    nine evaluations (r14: 40 in all; the evolution hands over at 0.72 × 40 = 0.6 × 48 rounded, after 31, as
    before): in the seven standard compiles kept, its proposals won at the top in two, both at B2, each the
    first to pass its screen, within its first three screens; at B1 none won. The ~8 evaluations it no longer
    makes cost about 3 fine-tunes a compile on SmolLM2 (docs/objective.md, "How long the refinement runs")."""

    evaluations: int
    rungs: tuple[float, ...]
    max_steps: int | None
    prior_probe_steps: int
    prior_sequences: int
    finalists: int = 1
    seeds: int = 3
    screen_share: float = 0.25
    granularity: Granularity = "layer"
    evolution_share: float = 0.6
    prior_end_ranks_only: bool = False

    def ladder(self, plan_steps: int) -> FidelityLadder:
        return ladder_for(plan_steps, self.rungs, self.max_steps, self.screen_share)


EFFORTS = {
    "quick": Effort(8, (0, 1), 100, prior_probe_steps=6, prior_sequences=8, finalists=2, evolution_share=1.0,
                    prior_end_ranks_only=True),
    "standard": Effort(40, (0, 0.25, 1), 400, prior_probe_steps=16, prior_sequences=8, finalists=2,
                       granularity="module", evolution_share=0.72),
    "thorough": Effort(120, (0, 0.125, 0.5, 1), None, prior_probe_steps=32, prior_sequences=32,
                       finalists=3, seeds=4, granularity="module"),
}


@dataclass
class CompileRequest:
    model: str
    budget: Budget
    data: str = "python-reference"
    bits: tuple[int, ...] = (2, 3, 4, 8)
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    granularity: Granularity | None = None  # None: the effort's
    effort: "str | Effort" = "quick"
    strategy: str = "autoqra"
    training: Training = field(default_factory=Training)
    device: Device = field(default_factory=Device)
    group_size: int = 128
    journal: Path | None = None
    work: Path | None = None
    resume: bool = False
    workers: int = 0
    ray_address: str | None = None
    held_out: str | None = None
    """A held-out file or saved folder of its own (`--held-out`); None: held out from `data`."""
    fields: Fields = field(default_factory=Fields)

    def __post_init__(self) -> None:
        if self.granularity is None:
            effort = self.effort if isinstance(self.effort, Effort) else EFFORTS.get(self.effort)
            self.granularity = effort.granularity if effort is not None else "layer"  # an unknown effort is refused later


@dataclass
class CompileOutcome:
    plan: Plan
    result: SearchResult
    above_maximum: bool
    pick: FinalPick


def _check_request(request: CompileRequest) -> None:
    if not isinstance(request.effort, Effort) and request.effort not in EFFORTS:
        raise QraError(f"--effort {request.effort!r} is not one of {', '.join(EFFORTS)}")
    known = (*STRATEGIES, *BASELINES)
    if request.strategy not in known:
        raise QraError(f"--strategy {request.strategy!r} is not one of {', '.join(known)}")
    if request.journal is not None and request.journal.exists() and not request.resume:
        raise QraError(f"journal {request.journal} exists: pass --resume to continue that compile, or remove it")


def budget_bounds(space: SearchSpace) -> tuple[int, int]:
    """The smallest and largest footprint any configuration of the space can have."""
    return space.cost(space.smallest()), space.cost(space.largest())


def _check_budget(space: SearchSpace, budget: Budget) -> bool:
    """Fails below the smallest footprint; returns whether the budget exceeds the largest."""
    smallest, largest = budget_bounds(space)
    if budget.bytes < smallest:
        raise QraError(
            f"budget {budget.text} is below the smallest possible footprint, {format_bytes(smallest)} "
            f"(every layer at {space.bits[0]} bits, rank {space.ranks[0]}): raise the budget, or lower "
            "--seq-len or --batch-size, or turn on --grad-checkpointing"
        )
    if budget.bytes >= largest:
        log.info("the budget %s fits even the largest configuration (%s): the best plan is returned",
                 budget.text, format_bytes(largest))
        return True
    return False


def _model(request: CompileRequest) -> tuple[ModelSource, ModelSpec, "PretrainedConfig"]:
    source, spec, config = resolve_spec(request.model, request.training.seq_len)
    if not source.has_weights:
        raise QraError(f"model {source.name!r} is a config without weights: the search measures the model itself")
    return source, spec, config


def _versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _evaluator(request: CompileRequest, setting: "Setting") -> FidelityEvaluator:
    # bf16 where the CPU computes it natively (it then also rounds weights as the bf16 runtime does), else fp32
    dtype = fastest_dtype()
    log.info("loading %s and tokenizing %s; evaluating in %s", setting.source.name, request.data, dtype)
    model, tokenizer = load_model(setting.source, "bfloat16", setting.config)
    training = setting.space.training
    data = prepare_data(setting.dataset, tokenizer, training.seq_len, training.batch_size, training.seed)
    calibration = calibration_batches(data.features, training.batch_size, data.pad)  # materialize's, so the search scores its weights
    cache = QuantCache(model, setting.space.spec, calibration, request.group_size, folder=setting.work / "qcache")
    return FidelityEvaluator(model, setting.space, data, cache, setting.effort.ladder(training.steps), tokenizer, dtype=dtype)


def _importance(request: CompileRequest, evaluator: FidelityEvaluator, effort: Effort, work: Path,
                on_stage: Callable[[StageProgress], None] | None = None) -> Importance:
    space = evaluator.space
    if request.strategy not in PRIORS_STRATEGIES:
        return flat_importance(len(space.units), space.bits, space.ranks)
    settings = PriorSettings(effort.prior_sequences, effort.prior_probe_steps, end_ranks_only=effort.prior_end_ranks_only)
    log.info("measuring importance priors: %d units x %d bit-widths, %d rank probes", len(space.units), len(space.bits),
             len(probed_ranks(space.ranks, settings.end_ranks_only)))
    journal = journal_path(work / "priors", evaluator, settings)
    importance = measure_priors(evaluator, settings, journal=journal, on_progress=on_stage)
    # the priors quantized all but the 8-bit weights off their floor sample: those too, so the search never
    # calibrates again
    evaluator.cache.quantize_all(bits for bits in space.bits if bits < 16)
    evaluator.cache.release_calibration()
    return importance


def _strategy(problem: Problem, name: str, seed: int, effort: Effort):
    if name == "autoqra":
        return AutoQRA(problem, seed, evolution_share=effort.evolution_share)
    return STRATEGIES[name](problem, seed) if name in STRATEGIES else Baseline(problem, name)


def journal_key(request: CompileRequest, prepared: "Prepared", strategy: str) -> str:
    """Everything a journaled score depends on besides the configuration: the evaluator (model, data,
    objective, ladder), the priors, the budget, the space, the strategy, its seed and its evaluations; and a
    held-out file of the user's (`--held-out`), by its path and content, where one is given (without one the
    key is what it was before `--held-out` existed, so older journals resume)."""
    identity = {
        "evaluator": prepared.evaluator.fingerprint,
        "importance": prepared.problem.importance.to_dict(),
        "budget": request.budget.bytes,
        "bits": list(request.bits),
        "ranks": list(request.ranks),
        "granularity": request.granularity,
        "strategy": strategy,
        "seed": request.training.seed,
        "evaluations": prepared.effort.evaluations,
    }
    if prepared.effort.evolution_share != Effort.evolution_share:  # keyed only off the default: older journals resume
        identity["evolution_share"] = prepared.effort.evolution_share
    if request.held_out is not None:
        identity["held_out"] = {"path": request.held_out, "sha256": content_digest(Path(request.held_out))}
    return digest(identity)


def _journal(request: CompileRequest, prepared: "Prepared") -> Journal | None:
    """The search's journal, opened (and checked against this compile) before anything is evaluated."""
    if request.journal is None:
        return None
    return Journal(request.journal, journal_key(request, prepared, request.strategy))


def _baseline_name(config: Config) -> str:
    return f"uniform {config[0].bits}-bit rank {config[0].rank}"


def _is_uniform(config: Config) -> bool:
    return len(set(config)) == 1


def finalists_of(result: SearchResult, problem: Problem, count: int, untrained: int | None) -> tuple[list[Config], Config]:
    """The `count` best distinct non-uniform configurations, ranked by the highest rung each reached, then by
    its score there (the top rung first; where fewer reached it, as when no challenger passed the
    refinement's screen and its incumbent is known at the screen only, or at the quick effort, whose search
    stops at step 0, the next rung fills in), and the uniform configuration to beat: the best the search
    scored at the first finalist's rung (its warm start holds the fitting uniforms), else the QLoRA-style
    default (`uniform_config`). The uniform is not run on the search's seed for its own sake: the final
    comparison runs it on every fresh seed.

    With measured priors, `untrained` names the rung at step 0 (else None). An adapter's B starts at zero, so
    step 0 scores the bits alone and cannot see rank: configurations with the same bits tie there, and the
    priors' prediction (`Importance.total_lost`, bits and ranks) breaks the tie; finalists chosen there are
    tried in the priors' order, not in their score's (docs/objective.md, "The quick effort's search")."""
    highest: dict[Config, Evaluation] = {}
    for evaluation in (e for e in result.history if math.isfinite(e.score)):
        if evaluation.config not in highest or evaluation.fidelity > highest[evaluation.config].fidelity:
            highest[evaluation.config] = evaluation

    def rank_key(evaluation: Evaluation) -> tuple[int, float, float]:
        tie = problem.importance.total_lost(evaluation.config) if evaluation.fidelity == untrained else 0.0
        return -evaluation.fidelity, evaluation.score, tie

    ranked = sorted(highest.values(), key=rank_key)
    finalists = [e.config for e in ranked if not _is_uniform(e.config)][:count]
    rung = highest[finalists[0]].fidelity if finalists else problem.top
    if rung == untrained:
        finalists.sort(key=problem.importance.total_lost)
    uniforms = [e for e in result.history if e.fidelity == rung and math.isfinite(e.score) and _is_uniform(e.config)]
    best_uniform = min(uniforms, key=rank_key).config if uniforms else uniform_config(problem)
    return finalists, best_uniform


def seed_journal(request: CompileRequest, prepared: "Prepared", seed: int) -> Journal:
    """The journal of the final comparison's runs on fresh `seed`, beside the search's (`request.journal`)."""
    if request.journal is None:
        raise ValueError("a compile without a journal keeps no journal of its final comparison")
    return Journal(request.journal.with_name(f"{request.journal.stem}.seed{seed}.jsonl"),
                   journal_key(request, prepared, f"finalists seed {seed}"))


def pick_plan(request: CompileRequest, prepared: "Prepared", result: SearchResult, pool: Pool,
              on_stage: Callable[[StageProgress], None] | None = None) -> FinalPick:
    """The final paired comparison (`qra.compiler.finalists`) on fresh seeds, each round's runs at once on the pool,
    each seed's runs journaled beside the search's journal, so a resumed compile replays them."""
    steps = prepared.evaluator.ladder.steps
    untrained = steps.index(0) if 0 in steps and request.strategy in PRIORS_STRATEGIES else None  # else flat priors
    finalists, best_uniform = finalists_of(result, prepared.problem, prepared.effort.finalists, untrained)
    top = prepared.problem.top
    seeds = [request.training.seed + 1 + index for index in range(prepared.effort.seeds)]
    runner: Pool = pool
    if request.journal is not None:
        journals = {seed: seed_journal(request, prepared, seed) for seed in seeds}
        runner = JournaledPool(pool, lambda task: journals[task.seed])
    log.info("final comparison: %d finalist(s) and %s on seeds %s", len(finalists), _baseline_name(best_uniform), seeds)
    done: list[int] = []
    planned = (len(finalists) + 1) * len(seeds)  # at most: a finalist that cannot win skips the seeds left
    if on_stage is not None:
        on_stage(StageProgress("final comparison", 0, planned))

    def run_all(runs: Sequence[tuple[Config, int]]) -> list[float]:
        def finished(position: int, outcome: Outcome) -> None:
            done.append(position)
            if on_stage is not None:
                on_stage(StageProgress("final comparison", len(done), planned, run_share=1.0))

        tasks = [Task(config, top, seed, stage="final comparison") for config, seed in runs]
        return [outcome.score for outcome in runner.run(tasks, finished)]

    pick = final_pick(run_all, finalists, best_uniform, seeds)
    if on_stage is not None:
        on_stage(StageProgress("final comparison", len(done), len(done), best=pick.predicted, uniform=pick.mean_of(pick.uniform)))
    return pick


def _seed_scores(pick: FinalPick) -> list[SeedScores]:
    records = [SeedScores(name=_baseline_name(pick.uniform), config=config_key(pick.uniform),
                          scores=pick.scores[config_key(pick.uniform)])]
    for index, (key, difference) in enumerate(pick.differences.items(), 1):
        records.append(SeedScores(name=f"finalist {index}", config=key, scores=pick.scores[key],
                                  paired_difference=difference.mean, paired_se=difference.se))
    return records


@dataclass
class Prepared:
    """Everything a search or a baseline needs, built once per request: the model, the space, the
    evaluator (with its quantization cache) and the problem (budget and importance priors)."""

    source: ModelSource
    spec: ModelSpec
    space: SearchSpace
    effort: Effort
    evaluator: FidelityEvaluator
    problem: Problem
    above_maximum: bool
    screen: BitScreen | None = None


@dataclass(frozen=True)
class Setting:
    """What a request resolves to before anything is measured: the model, its data, the space, the effort."""

    source: ModelSource
    spec: ModelSpec
    dataset: Dataset
    space: SearchSpace
    effort: Effort
    work: Path
    config: "PretrainedConfig"


def resolve(request: CompileRequest) -> Setting:
    """The request checked and resolved: the model's config, the data (with conversations, only for a model
    whose tokenizer has a chat template), the search space and the effort; no weights are loaded."""
    _check_request(request)
    source, spec, config = _model(request)
    dataset = load_dataset(request.data, request.held_out, request.training.seed, fields=request.fields)
    if has_conversations(dataset):
        require_chat_template(load_tokenizer(source))
    training = training_for(request.training, dataset)
    space = build_space(spec, request.bits, request.ranks, training, request.device, request.granularity, request.group_size)
    effort = request.effort if isinstance(request.effort, Effort) else EFFORTS[request.effort]
    return Setting(source, spec, dataset, space, effort, request.work or Path(".qra-work"), config)


def build_evaluator(request: CompileRequest) -> FidelityEvaluator:
    """The request's evaluator, as `prepare` builds it: what each worker of a pool loads once."""
    setting = resolve(request)
    return _evaluator(request, setting)


def prepare(request: CompileRequest, on_stage: Callable[[StageProgress], None] | None = None) -> Prepared:
    """Check the request, load the model and data, and measure (or replay) the importance priors."""
    setting = resolve(request)
    above_maximum = _check_budget(setting.space, request.budget)
    evaluator = _evaluator(request, setting)
    screen = screen_bits(evaluator, evaluator.data.held_out_prefix(setting.effort.prior_sequences), request.budget.bytes,
                         on_stage)
    evaluator.space = screen.space
    importance = _importance(request, evaluator, setting.effort, setting.work, on_stage)
    problem = Problem(screen.space, importance, request.budget.bytes, fidelities=tuple(range(evaluator.ladder.levels)))
    return Prepared(setting.source, setting.spec, screen.space, setting.effort, evaluator, problem, above_maximum, screen)


def open_compile_pool(request: CompileRequest, prepared: Prepared) -> Pool:
    """Where the request's candidate runs execute: `request.workers` Ray workers, or a Ray cluster at
    `request.ray_address`, each loading the request's evaluator once; else this process's evaluator."""
    # a worker needs the evaluator only; the journal is the driver's (and exists already on --resume)
    for_workers = replace(request, journal=None, resume=False, bits=prepared.space.bits)  # the screened widths
    return open_pool(prepared.evaluator, request.workers, request.ray_address,
                     functools.partial(build_evaluator, for_workers), prepared.evaluator.fingerprint)


def _plan(request: CompileRequest, prepared: Prepared, config: Config, predicted: Prediction, provenance: Provenance) -> Plan:
    """The configuration as a plan with its memory record, verified against the budget."""
    plan = Plan(
        model=model_ref(prepared.spec, prepared.source.name, content_hash(prepared.source)),
        budget=request.budget,
        training=prepared.space.training,
        device=request.device,
        layers=prepared.space.layer_plans(config),
        predicted=predicted,
        provenance=provenance,
    )
    plan = with_memory(plan, prepared.spec)
    verdict = verify_plan(plan, prepared.spec)
    if not verdict.verified:
        raise QraError(f"internal error: the {provenance.strategy} plan does not verify: {verdict.problems[0]}", exit_code=1)
    return plan


def _note(request: CompileRequest, config: Config, pick: FinalPick | None = None, screen: BitScreen | None = None) -> str:
    """The provenance note: what was searched (and which bit-widths were dropped as catastrophic) and, for a
    compiled plan, what the paired comparison decided."""
    effort = request.effort if isinstance(request.effort, str) else "custom"
    dropped = ""
    if screen is not None and screen.dropped:
        losses = ", ".join(f"{bits}-bit {loss:.2f}" for bits, loss in screen.dropped.items())
        dropped = f", dropped as worse than a uniform guess ({screen.guess:.2f}) by their uniform held-out loss: {losses}"
    verdict = ""
    if pick is not None and pick.differences:
        won = pick.differences.get(config_key(pick.config))  # the finalists run in turn: the winner, or none
        best = won or min(pick.differences.values(), key=lambda d: d.mean)
        verdict = (f"; {'the plan' if won else 'the best finalist'}'s paired difference from {_baseline_name(pick.uniform)} "
                   f"over {best.seeds} fresh seeds: {best.mean:+.4f} ± {best.se:.4f} (SE)")
        if pick.is_uniform:
            verdict += ", not beyond 2 SE: the plan is the uniform configuration"
    held_out = "" if request.held_out is None else f", held-out {request.held_out}"
    return (
        f"effort {effort}, granularity {request.granularity}, data {request.data}{held_out}{dropped}, "
        f"score: held-out loss averaged over the data's tasks, plan {config_key(config)}{verdict}"
    )


def _search_reporter(
    prepared: "Prepared", on_progress: Callable[[Evaluation], None] | None, on_stage: Callable[[StageProgress], None] | None
) -> Callable[[Evaluation], None]:
    """The search's per-evaluation callback: the caller's, and a `StageProgress` with the best score at the
    highest fidelity reached so far."""
    best: dict[int, float] = {}
    steps = prepared.evaluator.ladder.steps
    reported = [0]  # evaluations reported so far (workers finish out of order, so not the last index + 1)

    def report(evaluation: Evaluation) -> None:
        reported[0] += 1
        if on_progress is not None:
            on_progress(evaluation)
        best[evaluation.fidelity] = min(best.get(evaluation.fidelity, math.inf), evaluation.score)
        if on_stage is not None:
            on_stage(StageProgress("search", reported[0], prepared.effort.evaluations, best=best[max(best)],
                                   run_share=steps[evaluation.fidelity] / steps[-1]))

    return report


def compile_plan(
    request: CompileRequest, on_progress: Callable[[Evaluation], None] | None = None, prepared: Prepared | None = None,
    on_stage: Callable[[StageProgress], None] | None = None,
) -> CompileOutcome:
    """Run every stage and return the verified plan (not yet written) with the search's record. `on_progress`
    sees every search evaluation; `on_stage` every stage's progress (`qra.compiler.progress`). Candidate
    runs execute on the request's pool (`open_compile_pool`)."""
    began = time.perf_counter()
    prepared = prepared or prepare(request, on_stage)
    journal = _journal(request, prepared)
    pool = open_compile_pool(request, prepared)
    try:
        log.info("searching: %s, %d evaluations", request.strategy, prepared.effort.evaluations)
        strategy = _strategy(prepared.problem, request.strategy, request.training.seed, prepared.effort)
        reporter = _search_reporter(prepared, on_progress, on_stage)
        if on_stage is not None:
            on_stage(StageProgress("search", 0, prepared.effort.evaluations))
        result = run_search(strategy, None, prepared.effort.evaluations, reporter, journal, pool)
        pick = pick_plan(request, prepared, result, pool, on_stage)
    finally:
        pool.close()
    log.info("quantization cache: %s", prepared.evaluator.cache.stats)
    ladder = prepared.evaluator.ladder
    provenance = Provenance(
        strategy=request.strategy,
        seed=request.training.seed,
        evaluations={f"f{fidelity}": count for fidelity, count in result.evaluations.items()},
        wall_time_s=round(time.perf_counter() - began, 1),
        versions=_versions(),
        baselines={_baseline_name(pick.uniform): pick.mean_of(pick.uniform)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        note=_note(request, pick.config, pick, prepared.screen),
        finalists=_seed_scores(pick),
        truncated_at_step=ladder.steps[-1] if ladder.truncated else None,
    )
    fidelity = f"f{prepared.problem.top} (step {ladder.steps[-1]} of {ladder.plan_steps}), mean of seeds {pick.seeds_of(pick.config)}"
    predicted = Prediction(score=pick.predicted, metric="held-out loss", fidelity=fidelity)
    return CompileOutcome(_plan(request, prepared, pick.config, predicted, provenance), result, prepared.above_maximum, pick)


def baseline_plan(request: CompileRequest, prepared: Prepared, name: str) -> Plan:
    """A baseline's configuration (uniform, sequential, heuristic) at the request's budget, as a plan that
    is built from the same priors and space as the search's but not scored (its prediction is empty)."""
    if name not in BASELINES:
        raise QraError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    config = BASELINES[name](prepared.problem)
    provenance = Provenance(
        strategy=name,
        seed=request.training.seed,
        versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        note=_note(request, config, screen=prepared.screen),
    )
    return _plan(request, prepared, config, Prediction(), provenance)
