"""The training losses of the torch backend, summed (the loop divides by the global denominator): next-token
cross-entropy (`token_loss_sum`, and the LM head only where a loss reads it, a chunk at a time) and
MDLM's weighted masked cross-entropy (`weighted_loss_sum`). backends/mindspore/loss.py is the twin.

With a 151k vocabulary the LM head's logits dominate activation memory: a 2 x 2300-token padded batch
holds 0.7 G logits, 2.8 GB in bf16 and twice that once upcast to fp32 for the loss. Two savings, both
exact (the same per-token terms, summed):

* Positions: in SFT most positions are prompt, image or padding, whose logits no loss reads, so the
  LM head sees only the positions whose next token is trained (`trained_positions`).
* Chunks: beyond `CHUNK_ROWS` positions those logits are not held whole either; each chunk is a
  checkpointed `head -> CE` that recomputes its logits in the backward pass (one more LM-head
  forward for that row, a few percent of the step).

Liger's fused linear cross-entropy was measured here as the alternative and dropped: on the 3B bench
shape (about 2k trained positions per 4096-token row) it made the step 34% slower, since it
accumulates the 151936 x 2048 weight gradient once per chunk of a few dozen positions
(docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vltune.core.contracts import IGNORE_INDEX

CHUNK_ROWS = 2048
"""Positions per checkpointed chunk: 2048 x 151936 fp32 logits = 1.2 GB live at a time."""


def trained_positions(labels: np.ndarray) -> np.ndarray:
    """Positions p (over the whole batch) with labels[:, p + 1] trained: where logits are needed.

    Computed on the host from the numpy labels, so the step waits on no device-to-host copy."""
    return np.flatnonzero((np.asarray(labels)[:, 1:] != IGNORE_INDEX).any(axis=0))


def kept_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE (fp32) of logits [N, V] already computed at the kept positions, against `targets` [N]."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return kept_token_loss_sum(head(hidden), targets)


def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE (fp32 softmax) of `head(hidden)` [N, V] against `targets` [N] (-100 = not trained),
    without materialising the N x V logits."""
    if hidden.shape[0] <= CHUNK_ROWS:
        return _chunk_loss_sum(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        total = total + checkpoint(_chunk_loss_sum, head, hidden[start:stop], targets[start:stop], use_reentrant=False)
    return total


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (fp32) over labels != -100, and how many tokens that was."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def weighted_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of CE(logits, clean token) * weight, in fp32; no shift (each position
    predicts itself). Nothing masked gives 0 * logits.sum(), so every parameter still gets a (zero)
    gradient and ZeRO's bookkeeping stays whole."""
    selected = labels != IGNORE_INDEX
    if not bool(selected.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[selected].float(), labels[selected], reduction="none")
    return (ce * weights[selected].float()).sum()
