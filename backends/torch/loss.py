"""Next-token cross-entropy that projects only the positions whose next token is trained.

With a 151k vocabulary the LM head's logits dominate activation memory: a 2 x 2300-token padded batch
holds 0.7 G logits, 2.8 GB in bf16 and twice that once upcast to fp32 for the loss. In SFT most
positions are prompt, image or padding, whose logits no loss reads. transformers' forward takes
`logits_to_keep` (a 1-D tensor of sequence positions) and applies the LM head to those positions only,
so the loss below is the full one -- the same per-token terms, summed -- at a fraction of the memory
and of the LM head's FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vltune.core.contracts import IGNORE_INDEX


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p (over the whole batch) with labels[:, p + 1] trained: where logits are needed."""
    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()


def kept_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Summed CE (fp32) of logits [B, K, V] computed at `positions` [K] against labels [B, L]."""
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
