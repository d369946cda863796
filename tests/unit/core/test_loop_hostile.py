"""The loop never hands back non-finite weights as a finished run, and never loses a finished run to its evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.config import TrainArgs
from vltune.core.loop import TrainingStopped, run_training
from vltune.core.metrics import MetricsWriter


class Engine:
    """A fake engine: step i's loss and grad norm come from the given functions of i."""

    def __init__(self, loss=lambda i: 0.5, grad_norm=lambda i: 1.0):
        self.loss, self.grad_norm, self.i, self.stepped = loss, grad_norm, 0, 0

    def forward_backward(self, batch, loss_scale):
        return self.loss(self.i) * int((batch["labels"][:, 1:] != -100).sum())

    def reduce_sum(self, values):
        return list(values)

    def optimizer_step(self, lr_factor, max_grad_norm):
        self.i, self.stepped = self.i + 1, self.stepped + 1
        return self.grad_norm(self.i - 1)

    def zero_grad(self):
        self.i += 1

    def learning_rates(self):
        return {}

    def memory_stats(self):
        return {}


class Batches:
    def __next__(self):
        labels = np.full((1, 6), 3)
        return {"input_ids": np.zeros((1, 6), dtype=np.int64), "labels": labels, "attention_mask": np.ones((1, 6))}

    def state_dict(self):
        return {}


def _run(tmp_path, engine, steps, args=None, **kw):
    return run_training(args or TrainArgs(), engine, Batches(), steps, MetricsWriter(tmp_path / "m.jsonl", tensorboard=False),
                        show_progress=False, **kw)


def test_a_non_finite_grad_norm_stops_the_run_at_that_step(tmp_path):
    engine = Engine(grad_norm=lambda i: float("nan") if i == 1 else 1.0)
    with pytest.raises(TrainingStopped, match="step 2: the gradient norm is nan .* stopped without saving"):
        _run(tmp_path, engine, 5)
    assert engine.stepped == 2


def test_the_grad_norm_check_holds_for_every_engine_and_an_unknown_norm_passes(tmp_path):
    with pytest.raises(TrainingStopped, match="step 1: the gradient norm is inf"):  # DeepSpeed (bf16) included
        _run(tmp_path, Engine(grad_norm=lambda i: float("inf")), 3, TrainArgs(deepspeed="zero2"))
    unknown = Engine(grad_norm=lambda i: None)  # DeepSpeed with an optimizer that reports no norm
    assert _run(tmp_path, unknown, 3).steps == 3
    assert '"grad_norm": null' in (tmp_path / "m.jsonl").read_text()


def test_skipped_steps_leave_the_weights_alone_so_only_max_bad_steps_stops_them(tmp_path):
    bad_run = Engine(loss=lambda i: 0.5 if i == 0 else float("inf"))
    with pytest.raises(TrainingStopped, match="4 steps had a NaN/inf loss \\(max_bad_steps 3\\)"):
        _run(tmp_path, bad_run, 10, TrainArgs(max_bad_steps=3))
    scattered = Engine(loss=lambda i: float("nan") if i % 2 else 0.5)  # bad batches, not bad weights: the run goes on
    assert _run(tmp_path, scattered, 6, TrainArgs(max_bad_steps=100)).bad_steps == 3


def test_a_failing_final_evaluation_is_returned_not_raised(tmp_path):
    def evaluate():
        raise ValueError("`max_new_tokens` must be greater than 0")

    result = _run(tmp_path, Engine(), 3, evaluate=evaluate)
    assert result.steps == 3 and isinstance(result.eval_error, ValueError) and result.eval == {}
