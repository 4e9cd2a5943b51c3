"""AutoQRA stage "fidelity ladder": the objective the search calls, `evaluate(config, fidelity)`, lower is better.

A candidate's score is the held-out loss of the plan's own fine-tune: the runtime's `Run` (LoRA at each
unit's rank, the plan's learning rate, warm-up, cosine decay and batch order), on the float model with each
module's weight swapped for its cached GPTQ weight (`CachedWeights`). The fidelities are checkpoints of
that one run (successive halving; optuna's report-and-prune):

- f0: step 0, no training. From the zero init it is quantization damage only (B = 0, the adapter changes
  nothing: configurations with the same bits share one score, measured once); from a `residual` or
  `calibrated` init it is the damage left after each adapter's rank-r correction, so rank counts there too;
- f1 … top: the loss after the first `ladder.steps[k]` steps of the plan's schedule (rungs below the top
  are scored on the first `ladder.screen_share` of each task's held-out batches: on SmolLM2, scoring every
  held-out sequence cost as much as 14 training steps before r11 made scoring 1.35x faster, and a lower
  rung only decides promotion). A promoted candidate
  resumes from its last checkpoint (kept in memory) instead of restarting; the top rung is the plan's
  last step, so a top-rung score *is* the fine-tune's result for that seed, to the last bit.

Where the plan's schedule is too long to run per candidate, the effort caps the top rung
(`FidelityLadder.truncated`) and the plan's provenance says so.

The score is the mean over the data's tasks of each task's held-out loss, on every held-out sequence
(`qra.runtime.heldout`, which also gives each task's standard error). Every candidate is run with the same
seed, so the same LoRA initialisation and the same batches (common random numbers); `measure(config,
fidelity, seed)` runs another seed, for the paired finalist comparison (`qra.compiler.finalists`).

One base model serves every candidate: it is kept in one dtype (fp32 by default: exact, and fastest for tiny
models; bf16 steps SmolLM2-135M ~1.8x faster on an avx512_bf16 CPU and rounds weights as the bf16 runtime
does), and the adapter is removed after each run.
"""

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from qra.compiler.qcache import CachedWeights, QuantCache, batches_digest
from qra.compiler.space import Config, SearchSpace, config_key
from qra.files import digest
from qra.plans.memory import SettingsFor, plan_settings
from qra.plans.schema import Plan, Training
from qra.runtime.data import Batch, Dataset, Example, Feature, batch_source, batches, held_out_batches_by_task, pad_id, training_features
from qra.runtime.heldout import HELD_OUT_BATCH_SIZE, HeldOut, Scores, score_held_out
from qra.runtime.lora_init import needs_init
from qra.runtime.run import BatchFor, Run, RunState, open_run

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
KEPT_STATES = 16  # run checkpoints kept in memory for promotion (a few MB each at small ranks)


@dataclass(frozen=True)
class FidelityLadder:
    """Steps of the plan's own run at which a candidate is scored (f0, f1, ..., top), and the plan's
    full length: the top rung is below it only when the effort caps it (`truncated`)."""

    steps: tuple[int, ...] = (0, 10, 40)
    plan_steps: int = 40
    exact_match: bool = False
    screen_share: float = 1.0
    """The share of each task's held-out batches that scores the rungs below the top (the top: all)."""

    def __post_init__(self) -> None:
        if list(self.steps) != sorted(set(self.steps)) or self.steps[-1] > self.plan_steps:
            raise ValueError(f"ladder steps {self.steps} must rise and end at most at the plan's {self.plan_steps} steps")

    @property
    def levels(self) -> int:
        return len(self.steps)

    @property
    def truncated(self) -> bool:
        return self.steps[-1] < self.plan_steps


def ladder_for(
    plan_steps: int, rungs: tuple[float, ...], max_steps: int | None = None, screen_share: float = 1.0
) -> FidelityLadder:
    """The ladder at `rungs` (fractions of the top rung, 0 first, 1 last) of the plan's `plan_steps`,
    its top capped at `max_steps`, its lower rungs scored on `screen_share` of the held-out set."""
    top = plan_steps if max_steps is None else min(plan_steps, max_steps)
    steps = sorted({0, *(max(1, round(fraction * top)) for fraction in rungs if fraction > 0)})
    return FidelityLadder(steps=tuple(steps), plan_steps=plan_steps, screen_share=screen_share)


def cast_keeping_fp32_buffers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model`'s parameters in `dtype` (not `.float()`: transformers refuses it on models loaded from GGUF),
    its fp32 buffers (the rotary frequencies) kept in fp32, as `from_pretrained` and so materialize's model
    keep them: cast to bf16 they move, and every candidate's attention with them."""
    kept = {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}
    model = model.to(dtype)
    for name, buffer in kept.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)
    return model


@dataclass(frozen=True)
class EvalData:
    """Training sequences (every run batches them by its own seed: `batch_for`), the epoch-0 batches of
    the data's seed (GPTQ calibrates on the first of them), each task's held-out batches (the score is the
    mean of the tasks' losses), and held-out prompt/response examples for exact match."""

    features: tuple[Feature, ...]
    train: tuple[Batch, ...]
    held_out: HeldOut
    pad: int
    batch_size: int
    answers: tuple[Example, ...] = ()

    def batch_for(self, training: Training) -> BatchFor:
        return batch_source(self.features, self.batch_size, training.grad_accumulation, training.seed, self.pad)

    def held_out_prefix(self, sequences: int | None) -> HeldOut:
        """The first `sequences` held-out sequences of each task (all with None), in their batches."""
        if sequences is None:
            return {task: list(task_batches) for task, task_batches in self.held_out.items()}
        prefix: dict[str, list[Batch]] = {}
        for task, task_batches in self.held_out.items():
            kept, left = [], sequences
            for batch in task_batches:
                if left <= 0:
                    break
                kept.append({key: tensor[:left] for key, tensor in batch.items()})
                left -= len(batch["input_ids"])
            prefix[task] = kept
        return prefix

    def held_out_share(self, share: float) -> HeldOut:
        """The first `share` of each task's held-out batches (at least one)."""
        return {task: list(task_batches)[: max(1, math.ceil(share * len(task_batches)))]
                for task, task_batches in self.held_out.items()}


def prepare_data(dataset: Dataset, tokenizer: "PreTrainedTokenizerBase", seq_len: int, batch_size: int, seed: int = 0) -> EvalData:
    """Tokenize a data set as `qra materialize` does (plain text packed, prompt/response and conversations one
    per sequence); every held-out sequence of each task, batched by the data's `seed`."""
    pad = pad_id(tokenizer)
    features = tuple(training_features(dataset.train, tokenizer, seq_len))
    train = batches(features, batch_size, seed, 0, pad)
    held_out = held_out_batches_by_task(dataset, tokenizer, seq_len, HELD_OUT_BATCH_SIZE, seed)
    if not train or not all(held_out.values()):
        raise ValueError(f"data {dataset.name!r} gives no training or no held-out sequence at seq_len {seq_len}")
    answers = tuple(example for example in dataset.held_out if isinstance(example, Example) and not example.is_text)
    return EvalData(features, tuple(train), held_out, pad, batch_size, answers)


@dataclass(frozen=True)
class Measurement:
    """One fine-tune of a configuration (`config`, its key; "plan" for a whole plan) to `steps` steps on
    `seed`, scored at `fidelity`: each task's held-out loss, the exact-match accuracy where the data has
    answers, and the seconds it took."""

    config: str
    fidelity: int
    seed: int
    steps: int
    scores: Scores
    exact_match: float | None
    wall_s: float

    @property
    def loss(self) -> float:
        return self.scores.mean


class FidelityEvaluator:
    """Scores configurations of `space` on one shared base model (AutoQRA's multi-fidelity evaluator).

    The model is converted to `dtype` in place and is owned by the evaluator (and its cache) from then on.
    """

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        data: EvalData,
        cache: QuantCache,
        ladder: FidelityLadder | None = None,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if cache.model is not model:
            raise ValueError("the cache must quantize the evaluator's own model")
        self.model = cast_keeping_fp32_buffers(model, dtype)
        self.model.config.use_cache = False
        self.model.eval()
        self.space = space
        self.data = data
        self.cache = cache
        self.weights = CachedWeights(cache)
        self.ladder = ladder or FidelityLadder(steps=(0, space.training.steps), plan_steps=space.training.steps)
        if self.ladder.plan_steps != space.training.steps:
            raise ValueError(f"the ladder is for {self.ladder.plan_steps} steps, the plan trains {space.training.steps}")
        self.tokenizer = tokenizer
        self.seed = space.training.seed
        self.dtype = dtype
        self._states: OrderedDict[tuple[str, int], RunState] = OrderedDict()
        self._untrained: dict[tuple[int, tuple[int, ...]], Measurement] = {}

    @property
    def fingerprint(self) -> str:
        """What a measurement depends on besides the configuration: model, calibration, data, ladder, space."""
        identity = {**self.identity(), "ladder": asdict(self.ladder)}
        return digest(identity)

    def identity(self, held_out_sequences: int | None = None) -> dict:
        """The fingerprint's parts except the ladder, with the held-out set cut to its first
        `held_out_sequences` per task (all by default): what the importance priors depend on."""
        return {
            "model": self.cache.fingerprint,
            "calibration": self.cache.calibration_hash,
            "group_size": self.cache.group_size,
            "train": batches_digest(self.data.train),
            "held_out": [batches_digest(task) for task in self.data.held_out_prefix(held_out_sequences).values()],
            "units": [unit.label for unit in self.space.units],
            # whether batches pad is a fact of the data, already in the batches' digests
            "training": self.space.training.model_dump(exclude={"padded_batches"}),
            "dtype": str(self.dtype),
            "fp32_buffers": True,
            "scoring": "scored tokens only",  # r11: scores moved ~1e-4, so earlier journals are not mixed in
        }

    def training(self, seed: int | None = None) -> Training:
        """The plan's training settings, with another seed for the finalists' paired runs."""
        return self.space.training if seed is None else self.space.training.model_copy(update={"seed": seed})

    def evaluate(self, config: Config, fidelity: int, seed: int | None = None) -> float:
        """Held-out loss of `config` at `fidelity` (0 = no training), on `seed` (the plan's by default); lower is better."""
        return self.measure(config, fidelity, seed).loss

    def measure(self, config: Config, fidelity: int, seed: int | None = None) -> Measurement:
        if not 0 <= fidelity < self.ladder.levels:
            raise ValueError(f"fidelity {fidelity} is not on the ladder (0..{self.ladder.levels - 1})")
        top = fidelity == self.ladder.levels - 1
        held_out = self.data.held_out if top else self.data.held_out_share(self.ladder.screen_share)
        untrained = self.ladder.steps[fidelity] == 0
        # no step taken: the seed changes nothing, and from a zero init neither does rank (the same bits, the same
        # score); a non-zero init starts each adapter at its rank-r correction, so there rank counts
        sees_rank = self.space.training.lora_init != "zeros"
        bits = (fidelity, tuple((gene.bits, gene.rank) if sees_rank else gene.bits for gene in config))
        if untrained and bits in self._untrained:
            return replace(self._untrained[bits], config=config_key(config), seed=self.training(seed).seed, wall_s=0.0)
        result = self._measure(self.space.settings_for(config), self.ladder.steps[fidelity], self.training(seed), held_out,
                               config_key(config), fidelity)
        if untrained:
            self._untrained[bits] = result
        return result

    def measure_plan(self, plan: Plan, seed: int | None = None) -> Measurement:
        """A plan's whole fine-tune (every step of its schedule, uncapped) with each module at its planned
        bits and rank, scored on every held-out sequence: the quality benchmark's evaluator mode. For a
        configuration of the space it is the same run as the top rung (when the ladder is not truncated)."""
        mine, theirs = self.space.training.model_dump(exclude={"seed"}), plan.training.model_dump(exclude={"seed"})
        if mine != theirs:
            raise ValueError(f"the plan trains with {theirs}, the evaluator with {mine}")
        training = plan.training if seed is None else plan.training.model_copy(update={"seed": seed})
        return self._measure(plan_settings(plan), training.steps, training, self.data.held_out, None, self.ladder.levels - 1)

    def _measure(self, settings: SettingsFor, steps: int, training: Training, held_out: HeldOut, key: str | None,
                 fidelity: int) -> Measurement:
        """`steps` steps of the run (resumed from the checkpoint kept under `key`, if any), then scored."""
        began = time.perf_counter()
        if steps == 0 and not needs_init(self.space.spec, settings):
            with self.weights.weights(settings) as model:
                scores, accuracy = score_held_out(model, held_out), self._exact_match(model)
        else:
            with open_run(self.weights, self.space.spec, settings, training, self.data.batch_for(training), held_out) as run:
                if key is not None:
                    self._resume(run, key, training.seed, steps)
                run.train_to(steps)
                scores, accuracy = run.score(), self._exact_match(run.model)
                if key is not None and 0 < steps < training.steps:
                    self._keep(key, training.seed, run.state())
        result = Measurement(key or "plan", fidelity, training.seed, steps, scores, accuracy, time.perf_counter() - began)
        log.debug("f%d seed %d %s: loss %.4f ± %.4f (%.1fs)", fidelity, training.seed, result.config, result.loss,
                  scores.se, result.wall_s)
        return result

    def _resume(self, run: Run, key: str, seed: int, steps: int) -> None:
        """Continue from this candidate's latest checkpoint at or before `steps`, if one is kept."""
        state = self._states.get((key, seed))
        if state is not None and state.step <= steps:
            run.restore(state)

    def _keep(self, config: str, seed: int, state: RunState) -> None:
        key = (config, seed)
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > KEPT_STATES:
            self._states.popitem(last=False)

    @contextlib.contextmanager
    def probe(self, config: Config, steps: int) -> Iterator[Run]:
        """`config`'s run trained for the first `steps` steps of the plan's schedule (the priors' rank
        probes); the adapter is removed on exit."""
        training = self.training()
        with open_run(self.weights, self.space.spec, self.space.settings_for(config), training,
                      self.data.batch_for(training)) as run:
            run.train_to(steps)
            yield run

    def _exact_match(self, model: nn.Module) -> float | None:
        if not (self.ladder.exact_match and self.tokenizer is not None and self.data.answers):
            return None
        from qra.runtime.materialize import held_out_exact_match

        return held_out_exact_match(model, self.tokenizer, list(self.data.answers))
