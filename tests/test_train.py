"""The training loop: loss falls, the first step is measured, and an interrupted run resumes to the
same adapter as an uninterrupted one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qra.plans.memory import uniform_settings
from qra.plans.schema import Training
from qra.runtime.lora import attach_lora
from qra.runtime.run import Run
from qra.runtime.train import train_lora
from qra.testing import tiny_config, tiny_spec


class Interrupted(Exception):
    pass


def lora_model(dropout: float = 0.1):
    torch.manual_seed(0)
    config = tiny_config("llama", layers=2)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config)
    return attach_lora(model, tiny_spec("llama", layers=2), uniform_settings(16, 8), dropout=dropout)


def repeating_batches(step: int, micro: int) -> dict[str, torch.Tensor]:
    """A small fixed corpus (so the loss can fall), picked deterministically by step and micro-batch."""
    corpus = torch.arange(4 * 32).reshape(4, 32) % 37
    row = (2 * step + micro) % 3
    ids = corpus[row : row + 2]
    return {"input_ids": ids, "labels": ids}


TRAINING = Training(steps=6, batch_size=2, seq_len=32, grad_accumulation=2, learning_rate=5e-3, compute_dtype="float32", lora_dropout=0.1)


def test_training_lowers_held_out_loss_and_measures_its_first_step():
    model = lora_model()
    held_out = {"corpus": [repeating_batches(0, 0)]}
    result = train_lora(model, TRAINING.model_copy(update={"steps": 12}), repeating_batches, held_out=held_out)
    assert result.held_out_loss_after < result.held_out_loss_before
    assert result.held_out_by_task_after == {"corpus": result.held_out_loss_after}
    assert result.measured is not None and result.measured.saved_activation_bytes > 0
    assert len(result.losses) == 12


def test_the_headline_held_out_loss_is_the_mean_of_the_tasks_own_losses():
    model = lora_model()
    long_task = [repeating_batches(0, 0)] * 3
    short_task = [{"input_ids": batch["input_ids"][:, :4], "labels": batch["labels"][:, :4]} for batch in [repeating_batches(1, 0)]]
    result = train_lora(model, TRAINING.model_copy(update={"steps": 1}), repeating_batches, held_out={"long": long_task, "short": short_task})
    by_task = result.held_out_by_task_before
    assert set(by_task) == {"long", "short"}
    assert result.held_out_loss_before == pytest.approx((by_task["long"] + by_task["short"]) / 2)


def test_resume_after_interruption_reaches_the_same_adapter(tmp_path):
    uninterrupted = lora_model()
    train_lora(uninterrupted, TRAINING, repeating_batches, checkpoint_dir=tmp_path / "a", checkpoint_every=2)

    def stop_after_step_3(log):
        if log.step == 3:
            raise Interrupted

    interrupted = lora_model()
    with pytest.raises(Interrupted):
        train_lora(interrupted, TRAINING, repeating_batches, checkpoint_dir=tmp_path / "b", checkpoint_every=2, on_step=stop_after_step_3)
    resumed = lora_model()
    result = train_lora(resumed, TRAINING, repeating_batches, checkpoint_dir=tmp_path / "b", checkpoint_every=2, resume=True)

    assert result.resumed_from == 2
    expected = {n: p for n, p in uninterrupted.named_parameters() if p.requires_grad}
    for name, parameter in resumed.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], rtol=0, atol=0)


def test_measuring_the_datas_worst_batch_takes_the_largest_footprint_and_leaves_the_run_as_it_was():
    """A padded batch longer than any the schedule trains on: its step is measured after training (dropout on,
    so the random state matters too), the footprint reported is its, and the adapter is the one training gave."""
    from qra.runtime.run import Run
    from qra.runtime.train import train_run

    ids = torch.arange(2 * 48).reshape(2, 48) % 37
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    worst = {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}
    plain, measured = lora_model(), lora_model()
    plain_result = train_run(Run(plain, TRAINING, repeating_batches))
    measured_result = train_run(Run(measured, TRAINING, repeating_batches), worst_batch=worst)
    assert measured_result.measured.saved_activation_bytes > plain_result.measured.saved_activation_bytes
    for (name, a), (_, b) in zip(plain.named_parameters(), measured.named_parameters()):
        assert torch.equal(a, b), name
    assert measured_result.losses == plain_result.losses


def _gradient_norms_at_the_optimizer(training: Training) -> tuple[list[float], list[float]]:
    """The global gradient norm each optimizer step of a `Run` under `training` is taken with, and the norms
    the run recorded."""
    run = Run(lora_model(dropout=0.0), training, repeating_batches)
    norms: list[float] = []
    step = run.optimizer.step

    def observed_step(*args, **kwargs):
        grads = [p.grad for p in run.trainable.values() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kwargs)

    run.optimizer.step = observed_step
    run.train_to(training.steps)
    return norms, run.gradient_norms


def test_each_step_is_taken_with_its_gradient_clipped_to_max_grad_norm():
    training = TRAINING.model_copy(update={"lora_dropout": 0.0, "learning_rate": 5e-2})
    unclipped, recorded = _gradient_norms_at_the_optimizer(training.model_copy(update={"max_grad_norm": None}))
    assert recorded == pytest.approx(unclipped, rel=1e-5)
    limit = min(unclipped) / 2
    clipped, recorded = _gradient_norms_at_the_optimizer(training.model_copy(update={"max_grad_norm": limit}))
    assert clipped == pytest.approx([limit] * len(clipped), rel=1e-4)
    # the run records the norm before clipping: the one a diverging step shows
    assert min(recorded) > limit


def test_plans_clip_gradients_at_norm_one_unless_told_otherwise():
    assert Training().max_grad_norm == 1.0
