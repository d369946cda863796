"""The two training losses of the MindSpore backend, summed (the loop divides by the global denominator).

Kept apart from trainer.py so that models, parity tests and the MDLM sampler use them without the
training machinery; backends/torch has the same two functions in trainer.py and mdlm.py.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from vltune.core.contracts import IGNORE_INDEX


def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (fp32) over labels != -100: logits [B, L, V], labels [B, L]."""
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1].astype(ms.float32).reshape(-1, vocab)
    shift_labels = labels[:, 1:].reshape(-1)
    return ops.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def weighted_loss_sum(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """MDLM: sum over masked positions of CE(logits, clean token) * weight, fp32, no shift. Nothing masked
    gives 0 * logits.sum(), so every trainable parameter still gets a (zero) gradient."""
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels != IGNORE_INDEX).any().asnumpy()):
        return logits.sum() * 0.0
    ce = ops.cross_entropy(logits.astype(ms.float32).reshape(-1, vocab), flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights.reshape(-1).astype(ms.float32)).sum()
