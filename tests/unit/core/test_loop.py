"""The backend-neutral loop against a recording fake engine, and schedules against transformers'."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vltune.core.checkpointing import CheckpointManager, complete_checkpoints, read_trainer_state, resolve_resume
from vltune.core.config import TrainArgs
from vltune.core.loop import LoopState, run_training
from vltune.core.metrics import MetricsWriter, exact_match
from vltune.core.schedules import lr_at


class FakeBackend:
    """Records what the loop asks for; 'loss' of a micro-batch = loss_per_token per trained token."""

    def __init__(self, loss_per_token=0.5):
        self.calls: list[tuple] = []
        self.loss_per_token = loss_per_token
        self.step = 0

    def forward_backward(self, batch, loss_scale):
        n = int((batch["labels"][:, 1:] != -100).sum())
        self.calls.append(("fb", n, loss_scale))
        value = self.loss_per_token(self.step) if callable(self.loss_per_token) else self.loss_per_token
        return value * n

    def reduce_sum(self, values):
        return list(values)  # one process: the local sums are the global ones

    def optimizer_step(self, lr_factor, max_grad_norm):
        self.calls.append(("step", lr_factor, max_grad_norm))
        self.step += 1
        return 1.0

    def zero_grad(self):
        self.calls.append(("zero_grad",))
        self.step += 1

    def learning_rates(self):
        return {"llm": 0.1}

    def memory_stats(self):
        return {}

    def save_checkpoint(self, directory):
        (directory / "engine.json").write_text(json.dumps({"step": self.step}))


class Batches:
    def __init__(self, sizes):
        self.sizes, self.i = list(sizes), 0

    def __next__(self):
        n = self.sizes[self.i % len(self.sizes)]
        self.i += 1
        labels = np.full((1, 8), -100)
        labels[0, 8 - n :] = 7
        return {"input_ids": np.zeros((1, 8), dtype=np.int64), "labels": labels, "attention_mask": np.ones((1, 8))}

    def state_dict(self):
        return {"i": self.i}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tmp_path, args, backend, steps, sizes=(3,), **kw):
    return run_training(args, backend, Batches(sizes), steps, MetricsWriter(tmp_path / "m.jsonl", tensorboard=False),
                        show_progress=False, **kw)


def test_accumulated_loss_is_normalised_over_the_whole_batch(tmp_path):
    backend = FakeBackend()
    args = TrainArgs(gradient_accumulation_steps=2, learning_rate=1.0, lr_scheduler_type="constant", logging_steps=1)
    result = _run(tmp_path, args, backend, 3, sizes=[2, 6, 3, 1])
    fb = [c for c in backend.calls if c[0] == "fb"]
    # Micro-batches with 2 and 6 trained tokens share the scale 1/8, not 1/2 and 1/6.
    assert fb[0][2] == fb[1][2] == pytest.approx(1 / 8)
    assert fb[2][2] == fb[3][2] == pytest.approx(1 / 4)
    assert result.train_loss == pytest.approx(0.5) and result.steps == 3
    assert [r["step"] for r in _rows(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_mfu_is_logged_when_flops_and_peak_are_given(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 2))  # every perf_counter() call advances 2 s
    monkeypatch.setattr("vltune.core.loop.time.perf_counter", lambda: float(next(clock)))
    args = TrainArgs(lr_scheduler_type="constant", logging_steps=2)
    _run(tmp_path, args, FakeBackend(), 4, flops=lambda batch: 1e12, peak_flops=1e12)
    rows = [r for r in _rows(tmp_path / "m.jsonl") if "loss" in r]
    # 2 steps x 1 micro-batch x 1e12 FLOPs per logging window, over the window's measured seconds
    assert [r["mfu"] for r in rows] and all(0 < r["mfu"] <= 1 for r in rows)
    assert len({r["mfu"] for r in rows}) == 1
    (tmp_path / "cpu").mkdir()
    _run(tmp_path / "cpu", args, FakeBackend(), 2)  # no peak (CPU, unknown GPU): no mfu column
    assert all("mfu" not in r for r in _rows(tmp_path / "cpu" / "m.jsonl"))


def test_time_spent_getting_batches_is_logged(tmp_path):
    """data_wait_s: the window's seconds in next(batches), so a data loader that cannot keep up shows."""
    import time

    class SlowBatches(Batches):
        def __next__(self):
            time.sleep(0.02)
            return super().__next__()

    args = TrainArgs(gradient_accumulation_steps=2, lr_scheduler_type="constant", logging_steps=2)
    run_training(args, FakeBackend(), SlowBatches([3]), 4, MetricsWriter(tmp_path / "m.jsonl", tensorboard=False),
                 show_progress=False)
    rows = [r for r in _rows(tmp_path / "m.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(0.08 <= r["data_wait_s"] < 1.0 for r in rows)  # 4 draws of >= 20 ms each


def test_schedule_and_eval_cadence(tmp_path):
    backend = FakeBackend()
    args = TrainArgs(learning_rate=0.1, warmup_steps=2, lr_scheduler_type="linear", eval_steps=3, logging_steps=4)
    _run(tmp_path, args, backend, 7, evaluate=lambda: {"eval_loss": 1.0})
    factors = [c[1] for c in backend.calls if c[0] == "step"]
    assert factors == pytest.approx([lr_at(s, 1.0, 7, 2, "linear") for s in range(7)])
    rows = _rows(tmp_path / "m.jsonl")
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([0.1 * factors[3], 0.1 * factors[6]])
    assert [r["step"] for r in rows if "loss" in r] == [4, 7]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 7]
    assert [r["lr_llm"] for r in rows if "loss" in r] == [0.1, 0.1]


def test_early_stopping_stops_at_the_expected_step(tmp_path):
    """eval_loss improves at evals 1-3 (steps 2, 4, 6), then plateaus: patience 2 stops at step 10."""
    losses = iter([1.0, 0.8, 0.7, 0.7, 0.69, 0.7, 0.7])
    args = TrainArgs(eval_steps=2, early_stopping_patience=2, early_stopping_threshold=0.05, save_steps=100)
    result = _run(tmp_path, args, FakeBackend(), 20, evaluate=lambda: {"eval_loss": next(losses)},
                  checkpoints=CheckpointManager(tmp_path))
    assert result.stopped_early_at == 10 and result.steps == 10
    assert result.best_metric == 0.7 and result.best_checkpoint == "checkpoint-6"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_no_checkpoints_without_save_steps(tmp_path):
    losses = iter([1.0, 0.5, 0.2])
    result = _run(tmp_path, TrainArgs(eval_steps=1), FakeBackend(), 3, evaluate=lambda: {"eval_loss": next(losses)},
                  checkpoints=CheckpointManager(tmp_path))
    assert result.best_metric == 0.2 and result.best_checkpoint is None and complete_checkpoints(tmp_path) == []


def test_greater_is_better_for_accuracy(tmp_path):
    scores = iter([0.2, 0.5, 0.4, 0.45])
    args = TrainArgs(eval_steps=1, metric_for_best_model="eval_accuracy", early_stopping_patience=2)
    result = _run(tmp_path, args, FakeBackend(), 10, evaluate=lambda: {"eval_accuracy": next(scores)})
    assert result.best_metric == 0.5 and result.stopped_early_at == 4


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    nan_at = {2, 4}
    backend = FakeBackend(lambda step: float("nan") if step in nan_at else 0.5)
    result = _run(tmp_path, TrainArgs(logging_steps=1, max_bad_steps=2), backend, 6)
    assert result.bad_steps == 2 and result.steps == 6
    assert [c[0] for c in backend.calls if c[0] != "fb"].count("zero_grad") == 2
    assert result.train_loss == pytest.approx(0.5)  # the mean is over the good steps
    with pytest.raises(RuntimeError, match="max_bad_steps 1"):
        nan_at = {0, 1, 2}
        _run(tmp_path, TrainArgs(max_bad_steps=1), FakeBackend(lambda step: float("nan") if step in nan_at else 0.5), 6)


def test_checkpoints_are_rotated_but_the_best_is_kept(tmp_path):
    scores = iter([0.5, 0.9, 0.1, 0.2, 0.3, 0.1])  # best at step 2
    args = TrainArgs(save_steps=1, save_total_limit=2, eval_steps=1, metric_for_best_model="eval_accuracy")
    result = _run(tmp_path, args, FakeBackend(), 6, evaluate=lambda: {"eval_accuracy": next(scores)},
                  checkpoints=CheckpointManager(tmp_path, save_total_limit=2))
    assert result.best_checkpoint == "checkpoint-2"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-6"]
    state = read_trainer_state(tmp_path / "checkpoint-6")
    assert state["step"] == 6 and state["data"] == {"i": 6} and state["best_checkpoint"] == "checkpoint-2"
    assert json.loads((tmp_path / "checkpoint-6" / "engine.json").read_text()) == {"step": 6}
    assert resolve_resume(tmp_path, "auto") == tmp_path / "checkpoint-6"


def test_resumed_loop_continues_from_its_state(tmp_path):
    backend = FakeBackend()
    state = LoopState(step=4, loss_sum=2.0, loss_steps=4)
    result = _run(tmp_path, TrainArgs(logging_steps=1), backend, 6, state=state)
    assert [c[1] for c in backend.calls if c[0] == "step"] == pytest.approx([lr_at(s, 1.0, 6, 0, "cosine") for s in (4, 5)])
    assert result.steps == 6 and result.train_loss == pytest.approx(0.5)


def test_temporary_checkpoint_directories_are_never_resumed(tmp_path):
    (tmp_path / ".tmp-checkpoint-9").mkdir()
    (tmp_path / ".tmp-checkpoint-9" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-7").mkdir()  # a crash before trainer_state.json was written: incomplete
    assert resolve_resume(tmp_path, "auto") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-7"))


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


def test_metrics_writer_tensorboard_and_plot(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "loss": 2.0, "lr": 0.1})
    writer.write({"step": 1, "eval_loss": 1.5})
    writer.close()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("train/loss")[0].value == 2.0 and acc.Scalars("eval/eval_loss")[0].step == 1
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", resume_step=0, tensorboard=False)
    assert _rows(resumed.path) == []


def test_exact_match_normalises_case_and_punctuation():
    assert exact_match(["Red.", " blue", "green"], ["red", "Blue", "red"]) == pytest.approx(2 / 3)
    assert math.isclose(exact_match([], []), 0.0)
