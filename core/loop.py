"""The training loop, written once for every backend.

Order of events per optimizer step: draw `gradient_accumulation_steps` micro-batches, count their
trained tokens, forward/backward each with loss scale 1/tokens (so the loss is the mean over the
whole accumulated batch, however the tokens fall into micro-batches), set the scheduled learning
rate, clip and step, then log, then evaluate on the eval cadence. The engine only supplies the
TrainBackend methods.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from .config import TrainArgs
from .contracts import Batch, TrainBackend, count_trained_tokens
from .metrics import MetricsWriter
from .schedules import lr_at, warmup_steps_for


@dataclass
class LoopResult:
    steps: int
    train_loss: float
    """Mean of the per-step losses over the run."""
    last_loss: float
    tokens_per_s: float
    samples_per_s: float
    eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the final evaluation (empty without an eval set)."""


def run_training(
    args: TrainArgs,
    backend: TrainBackend,
    next_micro_batch: Callable[[], Batch],
    total_steps: int,
    writer: MetricsWriter,
    evaluate: Callable[[], dict[str, float]] | None = None,
    show_progress: bool = True,
) -> LoopResult:
    warmup = warmup_steps_for(total_steps, args.warmup_ratio, args.warmup_steps)
    losses: list[float] = []
    window_tokens = window_samples = 0
    total_tokens = total_samples = 0
    window_start = run_start = time.perf_counter()
    last_eval: dict[str, float] = {}
    bar = tqdm(total=total_steps, desc="train", disable=not show_progress, dynamic_ncols=True)

    for step in range(total_steps):
        micro = [next_micro_batch() for _ in range(args.gradient_accumulation_steps)]
        n_trained = sum(count_trained_tokens(b) for b in micro)
        if n_trained == 0:
            raise RuntimeError(f"step {step + 1}: no trained tokens in the batch (every label is -100)")
        loss_sum = sum(backend.forward_backward(b, 1.0 / n_trained) for b in micro)
        lr = lr_at(step, args.learning_rate, total_steps, warmup, args.lr_scheduler_type)
        grad_norm = backend.optimizer_step(lr, args.max_grad_norm)
        loss = loss_sum / n_trained
        if not math.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: loss is {loss}; lower learning_rate or check the data")
        losses.append(loss)

        n_tokens = sum(_input_tokens(b) for b in micro)
        n_samples = sum(_num_samples(b) for b in micro)
        window_tokens += n_tokens
        window_samples += n_samples
        total_tokens += n_tokens
        total_samples += n_samples
        done = step + 1
        bar.update(1)

        if done % args.logging_steps == 0 or done == total_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            row = {
                "step": done,
                "loss": round(loss, 6),
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens_per_s": round(window_tokens / elapsed, 1),
                "samples_per_s": round(window_samples / elapsed, 2),
            }
            writer.write(row)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            window_tokens = window_samples = 0
            window_start = time.perf_counter()

        if evaluate is not None and args.eval_steps > 0 and done % args.eval_steps == 0 and done != total_steps:
            last_eval = evaluate()
            writer.write({"step": done, **last_eval})
            bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
    bar.close()

    run_time = max(time.perf_counter() - run_start, 1e-9)
    if evaluate is not None:
        last_eval = evaluate()
        writer.write({"step": total_steps, **last_eval})
    return LoopResult(
        steps=total_steps,
        train_loss=sum(losses) / len(losses),
        last_loss=losses[-1],
        tokens_per_s=total_tokens / run_time,
        samples_per_s=total_samples / run_time,
        eval=last_eval,
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
