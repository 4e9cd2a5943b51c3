"""AutoQRA stage "fidelity ladder": the objective the search calls, `evaluate(config, fidelity)`, lower is better.

A candidate is the float model with each module's weight replaced by its cached GPTQ weight at the gene's
bits (16 keeps the float weight), and LoRA attached with each unit's rank, through the runtime's own
`attach_lora` and `train_lora`, so what the search measures is what `qra materialize` trains.

- f0: held-out loss with no training (a proxy: quantization damage only; LoRA's B starts at zero, so the
  adapter cannot change it and is not attached);
- f1: held-out loss after a short LoRA fine-tune (`FidelityLadder.steps[1]` steps) on the first training batches;
- f2: the same after a longer one (`steps[2]`, 4x f1 by default), which sees more of the data.

Exact-match accuracy on held-out prompt/response examples (greedy decoding) is an optional extra metric of
`measure` (`FidelityLadder.exact_match`); it is off by default because generation costs more than the loss.

One base model serves every candidate: it is kept in one dtype (fp32 by default: exact, and fastest for tiny
models; bf16 steps SmolLM2-135M ~1.8x faster on an avx512_bf16 CPU and rounds weights as the bf16 runtime
does), the quantized weights are swapped in place and the originals put back afterwards, and the adapter is
removed with peft's `unload()`.
Every evaluation seeds the LoRA initialisation and the fine-tune with the plan's seed, so a result depends
only on (config, fidelity, seed).
"""

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from torch import nn

from qra.compiler.qcache import QuantCache, batches_digest
from qra.compiler.space import Config, SearchSpace, config_key
from qra.runtime.data import Batch, Dataset, Example, batches, held_out_batches_by_task, pad_id, training_features
from qra.runtime.lora import attach_lora
from qra.runtime.train import task_mean_loss, train_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FidelityLadder:
    """Optimizer steps per fidelity (f0, f1, f2, ...); short fine-tunes use a higher learning rate than a
    full run so that a few steps move the loss."""

    steps: tuple[int, ...] = (0, 16, 64)
    learning_rate: float = 1e-3
    exact_match: bool = False

    @property
    def levels(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class EvalData:
    """Training batches (fine-tunes cycle through them in order), held-out batches (one group per task of
    the data set; the score is the mean of the tasks' losses), and held-out prompt/response examples for
    exact match (empty for plain text)."""

    train: tuple[Batch, ...]
    held_out: tuple[tuple[Batch, ...], ...]
    answers: tuple[Example, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    config: str
    fidelity: int
    loss: float
    exact_match: float | None
    steps: int
    wall_s: float


def prepare_data(
    dataset: Dataset, tokenizer, seq_len: int, batch_size: int, seed: int = 0, held_out_batches: int = 8
) -> EvalData:
    """Tokenize a data set as `qra materialize` does (plain text packed, prompt/response one per sequence);
    `held_out_batches` batches from each task."""
    pad = pad_id(tokenizer)
    train = batches(training_features(dataset.train, tokenizer, seq_len), batch_size, seed, 0, pad)
    held_out = tuple(
        tuple(task) for task in held_out_batches_by_task(dataset, tokenizer, seq_len, batch_size, seed, held_out_batches).values()
    )
    if not train or not all(held_out):
        raise ValueError(f"data {dataset.name!r} gives no training or no held-out sequence at seq_len {seq_len}")
    answers = tuple(example for example in dataset.held_out if not example.is_text)
    return EvalData(tuple(train), held_out, answers)


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
        ladder: FidelityLadder = FidelityLadder(),
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if cache.model is not model:
            raise ValueError("the cache must quantize the evaluator's own model")
        self.model = model.to(dtype)  # not .float(): transformers refuses it on models loaded from GGUF
        self.model.config.use_cache = False
        self.model.eval()
        self.space = space
        self.data = data
        self.cache = cache
        self.ladder = ladder
        self.tokenizer = tokenizer
        self.seed = space.training.seed
        self.dtype = dtype

    @property
    def fingerprint(self) -> str:
        """What a measurement depends on besides the configuration: model, calibration, data, ladder, space."""
        identity = {**self.identity(), "ladder": asdict(self.ladder)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def identity(self, held_out_batches: int | None = None) -> dict:
        """The fingerprint's parts except the ladder, with the held-out set cut to its first
        `held_out_batches` per task (all by default): what the importance priors depend on."""
        return {
            "model": self.cache.fingerprint,
            "calibration": self.cache.calibration_hash,
            "group_size": self.cache.group_size,
            "train": batches_digest(self.data.train),
            "held_out": [batches_digest(task[:held_out_batches]) for task in self.data.held_out],
            "units": [unit.label for unit in self.space.units],
            "training": self.space.training.model_dump(),
            "dtype": str(self.dtype),
        }

    def evaluate(self, config: Config, fidelity: int) -> float:
        """Held-out loss of `config` at `fidelity` (0 = no training); lower is better."""
        return self.measure(config, fidelity).loss

    def measure(self, config: Config, fidelity: int) -> Evaluation:
        if not 0 <= fidelity < self.ladder.levels:
            raise ValueError(f"fidelity {fidelity} is not on the ladder (0..{self.ladder.levels - 1})")
        began = time.perf_counter()
        steps = self.ladder.steps[fidelity]
        with self.quantized(config):
            if steps == 0:
                loss, accuracy = self.loss(self.model), self._exact_match(self.model)
            else:
                with self.adapted(config) as peft_model:
                    self.fine_tune(peft_model, steps)
                    loss, accuracy = self.loss(peft_model), self._exact_match(peft_model)
        result = Evaluation(config_key(config), fidelity, loss, accuracy, steps, time.perf_counter() - began)
        log.debug("f%d %s: loss %.4f (%.1fs)", fidelity, result.config, loss, result.wall_s)
        return result

    @contextlib.contextmanager
    def quantized(self, config: Config) -> Iterator[None]:
        """The base model with every module at its gene's bits; the float weights are back afterwards."""
        cached = [
            (self.space.spec.module_path(unit.layer, module), self.cache.weight(unit.layer, module, gene.bits))
            for unit, gene in zip(self.space.units, config)
            if gene.bits < 16
            for module in unit.modules
        ]
        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            for path, weight in cached:
                parameter = self.model.get_submodule(path).weight
                swapped.append((parameter, parameter.data))
                parameter.data = weight.to(parameter.dtype)
            yield
        finally:
            for parameter, original in swapped:
                parameter.data = original

    @contextlib.contextmanager
    def adapted(self, config: Config) -> Iterator[PeftModel]:
        """LoRA attached at each unit's rank (seeded initialisation); removed again with `unload()`."""
        requires_grad = [(parameter, parameter.requires_grad) for parameter in self.model.parameters()]
        torch.manual_seed(self.seed)
        peft_model = attach_lora(
            self.model, self.space.spec, self.space.settings_for(config), dropout=self.space.training.lora_dropout
        )
        try:
            yield peft_model
        finally:
            peft_model.unload()
            for parameter, flag in requires_grad:
                parameter.requires_grad_(flag)

    def fine_tune(self, peft_model: PeftModel, steps: int) -> None:
        """`steps` optimizer steps of the runtime's training loop on the first training batches."""
        training = self.space.training.model_copy(
            update={"steps": steps, "learning_rate": self.ladder.learning_rate, "grad_accumulation": 1}
        )
        train = self.data.train
        train_lora(peft_model, training, lambda step, micro: train[step % len(train)], measure=False)

    def loss(self, model: nn.Module, held_out: Sequence[Sequence[Batch]] | None = None) -> float:
        """The held-out loss the search minimizes: the mean over tasks (`task_mean_loss`)."""
        return task_mean_loss(model, self.data.held_out if held_out is None else held_out)

    def _exact_match(self, model: nn.Module) -> float | None:
        if not (self.ladder.exact_match and self.tokenizer is not None and self.data.answers):
            return None
        from qra.runtime.materialize import held_out_exact_match

        return held_out_exact_match(model, self.tokenizer, list(self.data.answers))
