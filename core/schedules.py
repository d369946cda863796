"""Learning-rate schedules as pure functions of the step, so both backends agree to the last digit."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int) -> int:
    """HF semantics: explicit warmup_steps win over warmup_ratio."""
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def lr_at(step: int, base_lr: float, total_steps: int, warmup: int, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based), as transformers' schedulers compute it.

    Linear warmup from 0 to base_lr over `warmup` steps, then cosine / linear decay to 0 at
    `total_steps`, or constant.
    """
    if step < warmup:
        return base_lr * step / max(1, warmup)
    if kind == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    if kind == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")
