"""The backend-neutral loop against a recording fake engine, and schedules against transformers'."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vltune.core.config import TrainArgs
from vltune.core.loop import run_training
from vltune.core.metrics import MetricsWriter, exact_match
from vltune.core.schedules import lr_at


class FakeBackend:
    """Records what the loop asks for; 'loss' of a micro-batch = 0.5 per trained token."""

    def __init__(self, loss_per_token: float = 0.5):
        self.calls: list[tuple] = []
        self.loss_per_token = loss_per_token

    def forward_backward(self, batch, loss_scale):
        n = int((batch["labels"][:, 1:] != -100).sum())
        self.calls.append(("fb", n, loss_scale))
        return self.loss_per_token * n

    def optimizer_step(self, lr, max_grad_norm):
        self.calls.append(("step", lr, max_grad_norm))
        return 1.0


def _batch(trained: int, length: int = 8) -> dict:
    labels = np.full((1, length), -100)
    labels[0, length - trained :] = 7
    return {"input_ids": np.zeros((1, length), dtype=np.int64), "labels": labels, "attention_mask": np.ones((1, length))}


def test_accumulated_loss_is_normalised_over_the_whole_batch(tmp_path):
    sizes = iter([2, 6, 3, 1] * 3)
    backend = FakeBackend()
    args = TrainArgs(gradient_accumulation_steps=2, learning_rate=1.0, lr_scheduler_type="constant", logging_steps=1)
    result = run_training(args, backend, lambda: _batch(next(sizes)), 3, MetricsWriter(tmp_path / "m.jsonl"), show_progress=False)
    fb = [c for c in backend.calls if c[0] == "fb"]
    # Micro-batches with 2 and 6 trained tokens share the scale 1/8, not 1/2 and 1/6.
    assert fb[0][2] == fb[1][2] == pytest.approx(1 / 8)
    assert fb[2][2] == fb[3][2] == pytest.approx(1 / 4)
    assert result.train_loss == pytest.approx(0.5) and result.steps == 3
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_schedule_and_eval_cadence(tmp_path):
    backend = FakeBackend()
    evals = []
    args = TrainArgs(learning_rate=0.1, warmup_steps=2, lr_scheduler_type="linear", eval_steps=3, logging_steps=4)
    run_training(args, backend, lambda: _batch(3), 7, MetricsWriter(tmp_path / "m.jsonl"),
                 evaluate=lambda: evals.append(1) or {"eval_accuracy": 0.5}, show_progress=False)
    lrs = [c[1] for c in backend.calls if c[0] == "step"]
    assert lrs == pytest.approx([lr_at(s, 0.1, 7, 2, "linear") for s in range(7)])
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.1)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 7]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [3, 6, 7]


def test_non_finite_loss_and_empty_batches_stop_with_a_message(tmp_path):
    with pytest.raises(RuntimeError, match="loss is nan"):
        run_training(TrainArgs(), FakeBackend(float("nan")), lambda: _batch(2), 2, MetricsWriter(tmp_path / "m.jsonl"), show_progress=False)
    with pytest.raises(RuntimeError, match="no trained tokens"):
        run_training(TrainArgs(), FakeBackend(), lambda: _batch(0), 2, MetricsWriter(tmp_path / "m.jsonl"), show_progress=False)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_equal_transformers(kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.3)
    sched = transformers.get_scheduler(
        "constant_with_warmup" if kind == "constant" else kind, opt, num_warmup_steps=5, num_training_steps=40
    )
    theirs = []
    for _ in range(40):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(s, 0.3, 40, 5, kind) for s in range(40)]
    assert np.allclose(ours, theirs, rtol=0, atol=1e-12)


def test_exact_match_normalises_case_and_punctuation():
    assert exact_match(["Red.", " blue", "green"], ["red", "Blue", "red"]) == pytest.approx(2 / 3)
    assert math.isclose(exact_match([], []), 0.0)
