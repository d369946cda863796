"""The training loop, written once for every backend.

Order of events per optimizer step: draw `gradient_accumulation_steps` micro-batches, count their
trained tokens (an MDLM batch brings its own denominator: core.contracts.loss_denominator),
forward/backward each with loss scale 1/tokens (so the loss is the mean over the whole accumulated
batch, however the tokens fall into micro-batches); skip the step if the loss is
not finite; else set the scheduled learning rate, clip and step. A run whose weights have turned
non-finite stops (TrainingStopped) rather than saving them. Then log, evaluate on the eval
cadence (tracking the best metric and early stopping), and checkpoint on the save cadence. The
engine only supplies the TrainBackend methods; everything needed to resume is in LoopState.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from tqdm import tqdm

from .checkpointing import CheckpointManager
from .config import TrainArgs
from .contracts import Batch, TrainBackend, loss_denominator
from .metrics import MetricsWriter
from .schedules import lr_at, warmup_steps_for


_NON_FINITE_FIX = ("Lower learning_rate (or max_grad_norm), train in fp32 (bf16: false), or check the data; "
                   "resume_from_checkpoint can restart from a checkpoint saved before this step.")


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite losses or weights): the message says why and what to change."""


class BatchSource(Protocol):
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict: ...


@dataclass
class LoopState:
    """Everything of the loop itself that a resumed run needs (saved in trainer_state.json)."""

    step: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    bad_steps: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    stopped_early_at: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopState":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class LoopResult:
    steps: int
    train_loss: float
    """Mean of the per-step losses over the run (resumed runs included)."""
    last_loss: float
    tokens_per_s: float
    samples_per_s: float
    eval: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_checkpoint: str | None = None
    stopped_early_at: int | None = None
    bad_steps: int = 0
    eval_error: Exception | None = None
    """What the final evaluation raised: the trained weights are saved first, then it is reported."""


def _improved(metric: float, best: float | None, greater: bool, threshold: float) -> bool:
    if best is None:
        return True
    return metric > best + threshold if greater else metric < best - threshold


def run_training(
    args: TrainArgs,
    backend: TrainBackend,
    batches: BatchSource,
    total_steps: int,
    writer: MetricsWriter,
    evaluate: Callable[[], dict[str, float]] | None = None,
    checkpoints: CheckpointManager | None = None,
    state: LoopState | None = None,
    show_progress: bool = True,
    flops: Callable[[Batch], float] | None = None,
    peak_flops: float | None = None,
) -> LoopResult:
    """Train for `total_steps` optimizer steps. With `flops` (model FLOPs of one micro-batch) and
    `peak_flops` (the peak of all devices together), logged rows carry `mfu`."""
    state = state or LoopState()
    warmup = warmup_steps_for(total_steps, args.warmup_ratio, args.warmup_steps)
    greater = args.greater_is_better if args.greater_is_better is not None else not args.metric_for_best_model.endswith("loss")
    last_loss = float("nan")
    window_tokens = window_samples = total_tokens = total_samples = 0
    window_flops = window_data_s = 0.0
    window_start = run_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not show_progress, dynamic_ncols=True)

    def save_checkpoint() -> str:
        trainer_state = {**asdict(state), "data": batches.state_dict(), "total_steps": total_steps}
        path = checkpoints.save(state.step, backend.save_checkpoint, trainer_state)
        return path.name

    def run_eval() -> bool:
        """Evaluate, track the best, maybe checkpoint it; True when early stopping says stop."""
        state.last_eval = evaluate()
        writer.write({"step": state.step, **state.last_eval})
        bar.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in state.last_eval.items()))
        if args.metric_for_best_model not in state.last_eval:
            raise KeyError(f"metric_for_best_model {args.metric_for_best_model!r} is not among {sorted(state.last_eval)}")
        metric = state.last_eval[args.metric_for_best_model]
        if _improved(metric, state.best_metric, greater, args.early_stopping_threshold):
            state.best_metric, state.evals_without_improvement = metric, 0
            if checkpoints is not None and args.save_steps:  # a run that keeps checkpoints keeps its best
                state.best_checkpoint = f"checkpoint-{state.step}"
                save_checkpoint()
        else:
            state.evals_without_improvement += 1
        return bool(args.early_stopping_patience) and state.evals_without_improvement >= args.early_stopping_patience

    while state.step < total_steps:
        data_start = time.perf_counter()
        micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
        window_data_s += time.perf_counter() - data_start  # building them, or waiting for the prefetch thread
        # Under data parallelism each rank holds a slice of the global batch: the denominator, the
        # loss and the counts are sums over ranks, so every rank scales by the same global count.
        (n_trained,) = backend.reduce_sum([sum(loss_denominator(b) for b in micro)])
        if n_trained == 0:
            raise RuntimeError(f"step {state.step + 1}: no trained tokens in the batch (every label is -100)")
        # The micro-batches' losses may still be device values: summed there, read once by reduce_sum.
        local_loss = sum(backend.forward_backward(b, 1.0 / n_trained) for b in micro)
        local_counts = [sum(_input_tokens(b) for b in micro), sum(_num_samples(b) for b in micro)]
        local_flops = sum(flops(b) for b in micro) if flops else 0.0
        loss_sum, n_tokens, n_samples, step_flops = backend.reduce_sum([local_loss, *local_counts, local_flops])
        loss = loss_sum / n_trained
        n_tokens, n_samples = int(n_tokens), int(n_samples)
        factor = lr_at(state.step, 1.0, total_steps, warmup, args.lr_scheduler_type)
        state.step += 1
        if math.isfinite(loss):
            grad_norm = backend.optimizer_step(factor, args.max_grad_norm)
            # The update has been applied: a NaN/inf norm has put NaN/inf into the weights (clipping scales
            # by max_norm / norm). None: the engine knows no norm (DeepSpeed, for some optimizers).
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingStopped(
                    f"step {state.step}: the gradient norm is {grad_norm} (loss {loss:.4g}), so the update made the "
                    f"weights non-finite; stopped without saving them. {_NON_FINITE_FIX}"
                )
            state.loss_sum += loss
            state.loss_steps += 1
        else:  # skipped: the weights are untouched
            backend.zero_grad()
            state.bad_steps += 1
            bar.write(f"step {state.step}: loss is {loss}; step skipped ({state.bad_steps} so far)")
            if state.bad_steps > args.max_bad_steps:
                raise TrainingStopped(f"{state.bad_steps} steps had a NaN/inf loss (max_bad_steps {args.max_bad_steps}); "
                                      f"{_NON_FINITE_FIX}")
            grad_norm = float("nan")
        last_loss = loss

        window_tokens, window_samples = window_tokens + n_tokens, window_samples + n_samples
        window_flops += step_flops
        total_tokens, total_samples = total_tokens + n_tokens, total_samples + n_samples
        bar.update(1)

        if state.step % args.logging_steps == 0 or state.step == total_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            row = {
                "step": state.step,
                "loss": round(loss, 6) if math.isfinite(loss) else str(loss),
                "lr": args.learning_rate * factor,
                **{f"lr_{name}": lr for name, lr in backend.learning_rates().items()},
                "grad_norm": None if grad_norm is None else round(grad_norm, 6) if math.isfinite(grad_norm) else str(grad_norm),
                "tokens_per_s": round(window_tokens / elapsed, 1),
                "samples_per_s": round(window_samples / elapsed, 2),
                "data_wait_s": round(window_data_s, 3),
                **backend.memory_stats(),
                **getattr(backend, "step_metrics", dict)(),  # e.g. an MoE router's aux_loss
            }
            if flops and peak_flops:
                row["mfu"] = float(f"{window_flops / elapsed / peak_flops:.4g}")  # tiny models: ~1e-5
            writer.write(row)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            window_tokens = window_samples = 0
            window_flops = window_data_s = 0.0
            window_start = time.perf_counter()

        evaluated = False
        if evaluate is not None and args.eval_steps > 0 and state.step % args.eval_steps == 0:
            evaluated = True
            if run_eval():
                state.stopped_early_at = state.step
                bar.write(f"early stopping at step {state.step}: no improvement of {args.metric_for_best_model} "
                          f"in {state.evals_without_improvement} evaluations")
                break
        if checkpoints is not None and args.save_steps and state.step % args.save_steps == 0:
            if not (evaluated and state.best_checkpoint == f"checkpoint-{state.step}"):  # not just saved as best
                save_checkpoint()
    bar.close()

    run_time = max(time.perf_counter() - run_start, 1e-9)
    eval_error = None
    if evaluate is not None and not (args.eval_steps and state.step % args.eval_steps == 0):
        try:
            run_eval()
        except Exception as e:  # the run itself is done: the caller saves its weights, then reports this
            eval_error, state.last_eval = e, {}  # not an earlier evaluation's numbers as if they were the final ones
    return LoopResult(
        steps=state.step,
        train_loss=state.loss_sum / max(state.loss_steps, 1),
        last_loss=last_loss,
        tokens_per_s=total_tokens / run_time,
        samples_per_s=total_samples / run_time,
        eval=state.last_eval,
        best_metric=state.best_metric,
        best_checkpoint=state.best_checkpoint,
        stopped_early_at=state.stopped_early_at,
        bad_steps=state.bad_steps,
        eval_error=eval_error,
    )



def _input_tokens(batch: Batch) -> int:
    """Tokens the language model processed (text + vision placeholders, padding excluded)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].size)


def _num_samples(batch: Batch) -> int:
    if "cu_seqlens" in batch:
        return len(batch["cu_seqlens"]) - 1
    return int(batch["input_ids"].shape[0])
