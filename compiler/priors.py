"""AutoQRA stage "priors": per-unit quantization sensitivity and rank plasticity, measured on the model.

- Sensitivity at b bits: the divergence of the model's next-token distribution from the float model's when that
  unit alone is quantized to b bits (its cached GPTQ weights) and every other unit keeps its float weights; no
  training. Per scored token, KL(p_float || p_quantized) is the expected loss increase under the float model's
  own predictions: the loss increase without the noise of which tokens the held-out batches hold (a measured
  loss difference on a few batches came out negative for 26 of 90 sub-8-bit entries on SmolLM2). Measured
  damage, not weight error: a layer's relative weight error barely varies across layers and does not predict
  its damage (docs/measurements.md). The layers before the unit are float in its measurement, so their
  outputs are replayed from the reference pass (`FloatPrefix`) and only the rest of the model runs.
- Sensitivity at 8 bits and more, where every unit, a module or a whole layer, sits at about the same floor
  (so it is not GPTQ damage, which grows with what is quantized), is measured on an evenly spaced sample of
  units only (`PriorSettings.floor_sample`); every other unit's is derived from its measurement at the largest
  bit-width below 8 by the quantization-noise law (`noise_law`). On SmolLM2 at module granularity this skips
  a third of the sensitivity measurements (docs/measurements.md, "Sensitivity at 8 bits, and on how many
  sequences").
- Plasticity at rank r: one short LoRA probe per rank with every unit at rank r on the float model (the
  first steps of the plan's own schedule), then each unit's share of the gain: the held-out loss increase if
  that unit's adapters alone were switched off, in the presence of the others (they are present in every
  real candidate too), estimated to first order (−⟨∂L/∂B, B⟩ summed over the unit's adapters) from one
  backward pass. With `PriorSettings.end_ranks_only` (the quick effort) only the smallest and the largest
  rank are probed. Switching each unit off in turn and scoring again (leave-one-out) costs one held-out pass
  per unit and rank: 630 passes at module granularity on SmolLM2, about half an hour here.

Both are divided by the float model's held-out loss (relative loss change), so they share one scale and
`Importance.lost` can subtract them. A sensitivity is never below zero (`token_divergences` sums terms that
are each at least zero); a negative plasticity (noise, an adapter that overfits) counts as 0, and each unit's
values are made monotone: fewer bits never hurt less, more rank never gains less.

Every measurement is journaled as it completes (`journal`, JSON, replaced atomically under a file lock, so
compiles sharing a work folder keep each other's measurements); a rerun with the same
model, data and settings reuses the finished entries (also under another fidelity ladder: the probes train the first
steps of the plan's own schedule), and a journal for anything else is started afresh.
"""

import contextlib
import json
import logging
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from qra.compiler.fidelity import FidelityEvaluator
from qra.compiler.importance import Importance
from qra.compiler.progress import StageProgress
from qra.compiler.space import Config, Gene
from qra.files import digest, write_text
from qra.runtime.data import IGNORE_INDEX
from qra.runtime.heldout import HeldOut, score_held_out, scored_logits, sequence_losses
from qra.runtime.run import Run

log = logging.getLogger(__name__)
FLOAT_BITS = 16
LAW_BITS = 8  # sensitivities at this many bits and more: by `noise_law` off the floor sample (if a lower width is measured)
PROGRESS_EVERY = 10
KL_BLOCK = 2**18  # [tokens, vocabulary] entries `token_divergences` works on at once: 1 MB per float32 tensor, in cache
KL_FAR = 80.0  # log p_float − log p below −KL_FAR: e^−g is near float32's largest, and past 88.7 overflows


@dataclass(frozen=True)
class PriorSettings:
    held_out_sequences: int = 8
    probe_steps: int = 16
    floor_sample: int = 8
    """How many units, evenly spaced, are measured at `LAW_BITS` and more to place the floor of `noise_law`."""
    end_ranks_only: bool = False
    """Probe only the smallest and the largest rank: a rank between takes the smallest's gain, the floor that
    monotonicity (more rank never gains less) gives it. On SmolLM2 with 6-step probes no unit gained more at
    a middle rank than at the smallest (docs/measurements.md, "Rank probes at the ends")."""

    def __post_init__(self) -> None:
        if self.held_out_sequences < 1 or self.probe_steps < 1 or self.floor_sample < 1:
            raise ValueError(f"prior settings must be at least 1: {self}")


class _Journal:
    """Raw measurements by name, persisted after each one when a path is given; entries of a journal
    whose names are not among `names` (a measure this version no longer takes) are dropped.

    Several compiles may share one work folder and so one journal: each write takes a file lock, merges
    what the others wrote since, and replaces the file atomically, so the journal holds the union of every
    process's measurements; before measuring, an entry another process finished is taken from the file."""

    def __init__(self, path: Path | None, key: str, names: set[str],
                 on_progress: Callable[[StageProgress], None] | None = None) -> None:
        self.expected = len(names)
        self.on_progress = on_progress
        self.path = path
        self.key = key
        self.names = names
        self.entries: dict[str, float] = self._read(warn=True)

    def _read(self, warn: bool = False) -> dict[str, float]:
        """The journal's entries on disk for this key (none for another key, or a file that does not parse)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            entries = {name: float(value) for name, value in data["entries"].items()} if data.get("key") == self.key else None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            if warn:
                log.warning("priors journal %s does not parse (%s): starting afresh", self.path, error)
            return {}
        if entries is None:
            if warn:
                log.warning("priors journal %s is for another model, data or settings: starting afresh", self.path)
            return {}
        return {name: value for name, value in entries.items() if name in self.names}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def refresh(self) -> None:
        """Take in what other processes sharing the journal have measured."""
        self.entries = {**self._read(), **self.entries}

    def get(self, name: str, measure: Callable[[], float]) -> float:
        if name not in self.entries:
            self.refresh()
        if name not in self.entries:
            self.record(name, measure())
        return self.entries[name]

    def report_training(self, run_share: float) -> None:
        """A probe's training just ended, `run_share` of a top-rung run: the time since the last report prices one
        for the compile's ETA (`qra.compiler.progress`) before any candidate trains (the quick search never does)."""
        if self.on_progress is not None:
            self.on_progress(StageProgress("priors", len(self.entries), self.expected, run_share=run_share))

    def record(self, name: str, value: float) -> None:
        self.entries[name] = value
        if self.path is not None:
            with FileLock(self.path.with_name(self.path.name + ".lock")):
                self.refresh()
                write_text(self.path, json.dumps({"key": self.key, "entries": self.entries}, indent=1))
        if self.on_progress is not None:
            self.on_progress(StageProgress("priors", len(self.entries), self.expected))
        if len(self.entries) % PROGRESS_EVERY == 0:
            log.info("priors: %d of %d measurements", len(self.entries), self.expected)


def _sensitivity_name(unit: int, bits: int) -> str:
    # named by the measure, so a journal of loss-difference sensitivities still lends its plasticity
    return f"sensitivity-kl/{unit}/{bits}"


def _plasticity_name(unit: int, rank: int) -> str:
    return f"plasticity-taylor/{unit}/{rank}"


def floor_sample(units: int, size: int) -> set[int]:
    """`size` unit indices spread evenly from the first unit to the last (every unit when there are fewer)."""
    if size >= units:
        return set(range(units))
    return {round(index * (units - 1) / max(size - 1, 1)) for index in range(size)}


def measured_bits(bits: Sequence[int], unit: int, sample: set[int]) -> list[int]:
    """The bit-widths a unit's sensitivity is measured at: every one below 16, except those at `LAW_BITS` and
    more for a unit off the floor sample, when a bit-width below `LAW_BITS` is there to derive them from."""
    derivable = any(b < LAW_BITS for b in bits)
    return [b for b in bits if b < FLOAT_BITS and (b < LAW_BITS or unit in sample or not derivable)]


def noise_law(reference: float, reference_bits: int, bits: int, floor: float) -> float:
    """Sensitivity at `bits` from the measurement `reference` at `reference_bits`:
    floor + max(reference − floor, 0)·4^−(bits − reference_bits), never below the floor.

    GPTQ's step halves with each bit, so the weight error's variance falls by 4 per bit, and the divergence,
    second order in a small perturbation, falls with it; what stays is the floor, the divergence any swap of
    a unit's weights shows in this measurement whatever its size, placed by the floor sample."""
    return floor + max(reference - floor, 0.0) * 4.0 ** (reference_bits - bits)


def probed_ranks(ranks: Sequence[int], end_ranks_only: bool) -> list[int]:
    """The ranks the plasticity probes train at: every one, or the smallest and the largest."""
    return sorted({min(ranks), max(ranks)}) if end_ranks_only else sorted(ranks)


def _entry_names(evaluator: FidelityEvaluator, sample: set[int], settings: PriorSettings) -> set[str]:
    space, units = evaluator.space, range(len(evaluator.space.units))
    sensitivities = {_sensitivity_name(unit, bits) for unit in units for bits in measured_bits(space.bits, unit, sample)}
    probed = probed_ranks(space.ranks, settings.end_ranks_only)
    return {"base", *sensitivities, *(_plasticity_name(unit, rank) for unit in units for rank in probed)}


def _journal_key(evaluator: FidelityEvaluator, settings: PriorSettings) -> str:
    """What the priors depend on: the evaluator without its ladder (the probes train the first steps of the
    plan's own schedule, which the identity holds) and with the held-out batches they score, and the
    settings but the floor sample's size (it only chooses which entries are measured); so a new ladder keeps them."""
    measured_as = {name: value for name, value in asdict(settings).items()
                   if name != "floor_sample" and not (name == "end_ranks_only" and not value)}  # as before r12 when off
    identity = {"evaluator": evaluator.identity(settings.held_out_sequences), "settings": measured_as}
    return digest(identity)


def journal_path(folder: Path, evaluator: FidelityEvaluator, settings: PriorSettings) -> Path:
    """Where the priors of this evaluator and settings are journaled in a shared `folder`: one file per key,
    so priors of another granularity or schedule kept in the same work folder are not overwritten."""
    return folder / f"{_journal_key(evaluator, settings)[:16]}.json"


def _only(evaluator: FidelityEvaluator, unit: int, gene: Gene, rank: int) -> Config:
    """Every unit at 16 bits and `rank`, except `unit`, which gets `gene`."""
    return tuple(gene if index == unit else Gene(FLOAT_BITS, rank) for index in range(len(evaluator.space.units)))


class FloatPrefix:
    """The float model's output of every decoder layer on the held-out batches, recorded while the reference
    log-probabilities are computed. A sensitivity measurement quantizes one unit and keeps every other unit
    float, so the layers before the unit's compute exactly what was recorded: `replaying(first)` returns
    their recorded outputs, in call order, instead of computing them (on average half of each forward).
    Written here because no library skips a prefix of a transformers model's decoder layers."""

    def __init__(self, model: nn.Module, layer_prefix: str, layers: int) -> None:
        self.layers = [model.get_submodule(f"{layer_prefix}.{index}") for index in range(layers)]
        self.outputs: list[list] = [[] for _ in self.layers]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        def keep(index: int):
            return lambda module, args, output: self.outputs[index].append(output)

        hooks = [layer.register_forward_hook(keep(index)) for index, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextlib.contextmanager
    def replaying(self, first: int) -> Iterator[None]:
        """Layers below `first` return their recorded outputs, in the order they were recorded."""
        def replay(index: int):
            calls = iter(self.outputs[index])
            return lambda *args, **kwargs: next(calls)

        for index in range(first):
            self.layers[index].forward = replay(index)
        try:
            yield
        finally:
            for layer in self.layers[:first]:
                del layer.forward  # the instance attribute: the class's forward again


def _scored_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token log-probabilities (float32) at every position whose next token the loss scores."""
    logits, targets = scored_logits(model, batch)
    return torch.log_softmax(logits[targets != IGNORE_INDEX].float(), dim=-1)


def float_log_probs(model: nn.Module, held_out: Sequence[Sequence[dict]]) -> list[list[torch.Tensor]]:
    """The reference of `divergence`: the float model's scored log-probabilities, per task and batch."""
    with torch.no_grad():
        return [[_scored_log_probs(model, batch) for batch in task] for task in held_out]


def token_divergences(float_log_p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Per token, KL(p_float || p) from two [tokens, vocabulary] tensors of log-probabilities: a sum over the
    vocabulary of terms that are each at least zero, so never below zero.

    With g = log p_float − log p, the term of a vocabulary entry is p_float·(e^−g − 1 + g), at least zero as
    e^x ≥ 1 + x, computed with expm1 (as p − p_float·(1 − g), the same value, where g < −`KL_FAR` and e^−g
    would overflow) and clamped at zero against its rounding. The terms sum to Σ p_float·g, the textbook
    form, where both distributions sum to one, but they do not cancel: log-probabilities that differ from
    the float model's by rounding alone (an 8-bit unit, or the float model itself) give the square of that
    rounding, where Σ p_float·g gives the rounding itself, of either sign (a log_softmax normalized off by
    1e-7 is a KL of ∓1e-7). Worked on in blocks of `KL_BLOCK` entries."""
    rows = max(1, KL_BLOCK // float_log_p.shape[-1])
    blocks = zip(float_log_p.split(rows), log_p.split(rows))
    return torch.cat([_block_divergences(reference, other) for reference, other in blocks])


def _block_divergences(float_log_p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    gap = float_log_p - log_p
    negated = gap.neg().clamp_(max=KL_FAR)
    terms = torch.expm1(negated).sub_(negated)
    float_p = float_log_p.exp()
    terms.mul_(float_p)
    far = gap < -KL_FAR
    if far.any():
        terms[far] = log_p[far].exp() - float_p[far] * (1 - gap[far])
    return terms.clamp_min_(0).sum(dim=-1)


def divergence(model: nn.Module, held_out: Sequence[Sequence[dict]], reference: list[list[torch.Tensor]]) -> float:
    """Mean over tasks of the per-token KL(p_float || p_model) on the held-out batches (the sensitivity
    measure): each token's by `token_divergences`, so never below zero, summed in float64."""
    per_task = []
    with torch.no_grad():
        for batches, references in zip(held_out, reference):
            total = tokens = 0.0
            for batch, float_log_p in zip(batches, references):
                total += float(token_divergences(float_log_p, _scored_log_probs(model, batch)).sum(dtype=torch.float64))
                tokens += float_log_p.shape[0]
            per_task.append(total / tokens)
    return statistics.fmean(per_task)


def _loss(model: nn.Module, held_out: HeldOut) -> float:
    return score_held_out(model, held_out).mean


def _derive_from_floor(raw: list[dict[int, float]], bits: Sequence[int], sample: set[int]) -> None:
    """Fill in, by `noise_law`, each unit's sensitivity at the bit-widths it was not measured at; the floor at
    each such bit-width is the median over the floor sample."""
    for target in bits:
        if target >= FLOAT_BITS or all(target in by_bits for by_bits in raw):
            continue
        floor = statistics.median(raw[unit][target] for unit in sorted(sample))
        for by_bits in raw:
            if target not in by_bits:
                reference_bits = max(b for b in by_bits if b < target)
                by_bits[target] = noise_law(by_bits[reference_bits], reference_bits, target, floor)


def _measure_sensitivity(
    evaluator: FidelityEvaluator, journal: _Journal, held_out: HeldOut, sample: set[int]
) -> list[dict[int, float]]:
    rank = evaluator.space.ranks[0]
    spec = evaluator.space.spec
    prefix = FloatPrefix(evaluator.model, spec.layer_prefix, len(spec.layers))
    reference: list[list[torch.Tensor]] = []
    raw = []
    for unit in range(len(evaluator.space.units)):
        by_bits = {bits: 0.0 for bits in evaluator.space.bits if bits >= FLOAT_BITS}
        for bits in measured_bits(evaluator.space.bits, unit, sample):

            def measure(unit: int = unit, bits: int = bits) -> float:
                tasks = list(held_out.values())
                if not reference:
                    with prefix.recording():
                        reference.extend(float_log_probs(evaluator.model, tasks))
                settings = evaluator.space.settings_for(_only(evaluator, unit, Gene(bits, rank), rank))
                with evaluator.weights.weights(settings) as model, prefix.replaying(evaluator.space.units[unit].layer):
                    return divergence(model, tasks, reference)

            by_bits[bits] = journal.get(_sensitivity_name(unit, bits), measure)
        raw.append(by_bits)
    _derive_from_floor(raw, evaluator.space.bits, sample)
    return raw


def _adapter_contributions(run: Run, held_out: HeldOut) -> dict[str, float]:
    """First-order estimate, per LoRA module, of the held-out loss increase if its adapter were switched off.

    The model's output is linear in each adapter's B, and switching the adapter off sets B to 0, a step of
    −B: to first order the loss changes by −⟨∂L/∂B, B⟩ (the Taylor importance of pruning). One backward
    pass over the held-out batches gives it for every module at once; L is the mean over tasks of each
    task's loss, the score the search minimizes."""
    model = run.model
    model.eval()
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    model.zero_grad(set_to_none=True)
    for batches in held_out.values():
        tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
        for batch in batches:
            sums, _ = sequence_losses(model, batch)
            (sums.sum() / (tokens * len(held_out))).backward()
    contributions = {name: -float((p.grad * p.detach()).sum()) for name, p in lora_b.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return contributions


def _probe(evaluator: FidelityEvaluator, journal: _Journal, held_out: HeldOut, rank: int, steps: int) -> None:
    """One joint probe at `rank` (the first `steps` steps of the plan's schedule), then each unit's share of
    the adapters' gain: the summed first-order contributions of its modules' adapters."""
    config = evaluator.space.uniform(FLOAT_BITS, rank)
    with evaluator.probe(config, steps) as run:
        journal.report_training(steps / evaluator.ladder.steps[-1])
        contributions = _adapter_contributions(run, held_out)
    for index, unit in enumerate(evaluator.space.units):
        paths = [evaluator.space.spec.module_path(unit.layer, module) + "." for module in unit.modules]
        gain = sum(value for name, value in contributions.items() if any(f".{path}" in f".{name}" for path in paths))
        journal.record(_plasticity_name(index, rank), gain)


def _measure_plasticity(
    evaluator: FidelityEvaluator, journal: _Journal, held_out: HeldOut, settings: PriorSettings
) -> list[dict[int, float]]:
    units = range(len(evaluator.space.units))
    probed = probed_ranks(evaluator.space.ranks, settings.end_ranks_only)
    for rank in probed:
        journal.refresh()
        if not all(_plasticity_name(unit, rank) in journal for unit in units):
            _probe(evaluator, journal, held_out, rank, settings.probe_steps)
    return _plasticity_from(journal.entries, len(units), evaluator.space.ranks, probed)


def _plasticity_from(entries: dict[str, float], units: int, ranks: Sequence[int], probed: Sequence[int]) -> list[dict[int, float]]:
    """Each unit's gain at every rank: a rank not probed takes the gain at the largest probed rank below it."""
    def gain(unit: int, rank: int) -> float:
        return entries[_plasticity_name(unit, max(probe for probe in probed if probe <= rank))]

    return [{rank: gain(unit, rank) for rank in ranks} for unit in range(units)]


def _monotone(values: dict[int, float], scale: float, descending: bool) -> dict[int, float]:
    """Clip at 0, divide by `scale`, and take the running maximum along the keys (descending or ascending)."""
    result, best = {}, 0.0
    for key in sorted(values, reverse=descending):
        best = max(best, values[key] / scale)
        result[key] = best
    return result


def measure_priors(
    evaluator: FidelityEvaluator, settings: PriorSettings = PriorSettings(), journal: Path | None = None,
    on_progress: Callable[[StageProgress], None] | None = None,
) -> Importance:
    """AutoQRA's importance priors for every unit of the evaluator's space (resumable through `journal`)."""
    sample = floor_sample(len(evaluator.space.units), settings.floor_sample)
    record = _Journal(journal, _journal_key(evaluator, settings), _entry_names(evaluator, sample, settings), on_progress)
    if on_progress is not None:
        on_progress(StageProgress("priors", len(record.entries), record.expected))
    held_out = evaluator.data.held_out_prefix(settings.held_out_sequences)
    base = record.get("base", lambda: _loss(evaluator.model, held_out))
    sensitivity = _measure_sensitivity(evaluator, record, held_out, sample)
    plasticity = _measure_plasticity(evaluator, record, held_out, settings)
    log.info("priors measured (%d entries, base loss %.4f)", len(record.entries), base)
    return _importance(sensitivity, plasticity, base)


def _importance(sensitivity: list[dict[int, float]], plasticity: list[dict[int, float]], base: float) -> Importance:
    return Importance(
        sensitivity=tuple(_monotone(values, base, descending=True) for values in sensitivity),
        plasticity=tuple(_monotone(values, base, descending=False) for values in plasticity),
    )


def importance_from_journal(path: Path, bits: Sequence[int] = (), ranks: Sequence[int] = (),
                            floor_sample_size: int = PriorSettings.floor_sample) -> Importance:
    """The priors a finished compile measured, read back from its priors journal (`journal_path`) without the
    model, for a space of the bit-widths and ranks the journal measured and `bits` and `ranks` besides: the
    entries `measure_priors` would read, the rest derived as it derives them (sensitivities by `noise_law` off
    the floor sample, ranks not probed from the probed rank below). For tools that study a compile's priors
    against its search."""
    entries = json.loads(path.read_text())["entries"]
    measured = [name.split("/") for name in entries if name.startswith(("sensitivity-kl/", "plasticity-taylor/"))]
    units = 1 + max(int(unit) for _, unit, _ in measured)
    bits = sorted({*bits, *(int(width) for kind, _, width in measured if kind == "sensitivity-kl")})
    probed = sorted({int(rank) for kind, _, rank in measured if kind == "plasticity-taylor"})
    sample = floor_sample(units, floor_sample_size)
    sensitivity = [{b: 0.0 for b in bits if b >= FLOAT_BITS} | {b: entries[_sensitivity_name(unit, b)] for b in
                    measured_bits(bits, unit, sample)} for unit in range(units)]
    _derive_from_floor(sensitivity, bits, sample)
    plasticity = _plasticity_from(entries, units, sorted({*ranks, *probed}), probed)
    return _importance(sensitivity, plasticity, entries["base"])
