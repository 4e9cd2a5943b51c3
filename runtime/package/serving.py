"""What each package serves, measured in the runtime it is served in: the held-out loss of every format
against the trained model's, on the same held-out sequences, paired per sequence.

The trained model (the GPTQ base with its adapter, in qra) gives each held-out sequence a summed loss and a
token count (`held_out_sums`); a format's runtime gives the same for the same tokens. Their difference per
sequence has the ratio estimator's standard error (`heldout.task_score`), so a format's loss gap comes with
its own paired SE. Runtimes that take one unpadded sequence at a time (llama.cpp, onnxruntime) are fed each
held-out sequence from position 0, exactly the tokens torch scores.
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qra.runtime.data import Batch
from qra.runtime.heldout import HeldOut, Scores, logit_losses, task_score

Sums = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per task: the summed next-token loss of each held-out sequence, and its scored-token count."""

SequenceLogits = Callable[[list[int]], np.ndarray]
"""A runtime's logits [len(ids), vocab] for one unpadded sequence."""


def sequences(batch: Batch) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Each sequence of a right-padded batch: its token ids and labels without the padding."""
    for row in range(batch["input_ids"].shape[0]):
        mask = batch["attention_mask"][row]
        length = int(mask.sum())
        if not bool(mask[:length].all()):
            raise ValueError("held-out batches must be right-padded: each sequence is scored from position 0")
        yield batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length]


def sequence_sums(logits_of: SequenceLogits, held_out: HeldOut) -> Sums:
    """`held_out_sums` for a runtime that scores one sequence at a time."""
    sums = {}
    for task, batches in held_out.items():
        parts = []
        for batch in batches:
            for ids, labels in sequences(batch):
                logits = torch.from_numpy(np.asarray(logits_of(ids), dtype=np.float32))
                parts.append(logit_losses(logits[None], labels[None]))
        if parts:
            sums[task] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return sums


def scores(sums: Sums) -> Scores:
    return Scores({task: task_score(*parts) for task, parts in sums.items()})


def paired_difference(sums: Sums, reference: Sums) -> Scores:
    """Per task, the loss of `sums` minus the reference's on the same tokens, with the SE of that difference."""
    return scores({task: (sums[task][0] - reference[task][0], sums[task][1]) for task in reference})


def serving_record(runtime: str, sums: Sums, trained: Sums | None) -> dict[str, Any]:
    """The manifest's `serving` entry: the runtime, its held-out loss (mean over tasks ± SE, and per task),
    and its difference from the trained model's loss with the paired SE (None without the trained sums)."""
    own = scores(sums)
    record: dict[str, Any] = {"runtime": runtime, "held_out_loss": own.mean, "se": own.se,
                              "by_task": {task: score.loss for task, score in own.by_task.items()}}
    if trained is not None:
        difference = paired_difference(sums, trained)
        record["vs_trained"] = {"difference": difference.mean, "se": difference.se}
    return record


def llama_cpp_logits_of(model: Path, adapter: Path | None = None, context: int = 512,
                        threads: int | None = None) -> tuple[SequenceLogits, Callable[[], None]]:
    """A llama.cpp (llama-cpp-python) scorer of one sequence at a time on the CPU, with the GGUF LoRA
    `adapter` applied when given; returns it and the function that frees the model."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=None if adapter is None else str(adapter), n_ctx=context,
                logits_all=True, n_gpu_layers=0, n_threads=threads, verbose=False)

    def logits_of(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits_of, llm.close
