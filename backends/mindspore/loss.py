"""The two training losses of the MindSpore backend, summed (the loop divides by the global denominator).

Kept apart from engine.py so that models, parity tests and the MDLM sampler use them without the
training machinery; backends/torch/loss.py has the same functions. Also the router load-balancing
loss of MoE models.
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


def router_logits(model) -> list[Tensor]:
    """The router logits [tokens, experts] each MoE block kept from the model's last forward (models/entry.py)."""
    return [cell.router_logits for _, cell in model.cells_and_names() if getattr(cell, "router_logits", None) is not None]


def load_balancing_loss(logits: list[Tensor], num_experts: int, top_k: int, attention_mask: Tensor | None = None) -> Tensor:
    """The Switch-Transformer load-balancing loss over all MoE layers, as transformers'
    `load_balancing_loss_func`: E * sum_e f_e * P_e, with f_e the share of top-k assignments to expert e
    and P_e its mean router probability, both over the tokens the mask keeps (padding left out)."""
    counts = ops.zeros(num_experts, ms.float32)
    probs_sum = ops.zeros(num_experts, ms.float32)
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1, 1).astype(ms.float32)
    for layer in logits:
        probs = ops.softmax(layer.astype(ms.float32), axis=-1)
        _, chosen = ops.topk(probs, top_k)
        assigned = ops.stop_gradient(ops.one_hot(chosen, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)).sum(1))
        if mask is None:
            counts, probs_sum, rows = counts + assigned.sum(0), probs_sum + probs.sum(0), rows + probs.shape[0]
        else:
            counts, probs_sum, rows = counts + (assigned * mask).sum(0), probs_sum + (probs * mask).sum(0), rows + mask.sum()
    return (counts / rows * (probs_sum / rows)).sum() * num_experts


def weighted_loss_sum(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """MDLM: sum over masked positions of CE(logits, clean token) * weight, fp32, no shift. Nothing masked
    gives 0 * logits.sum(), so every trainable parameter still gets a (zero) gradient."""
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels != IGNORE_INDEX).any().asnumpy()):
        return logits.sum() * 0.0
    ce = ops.cross_entropy(logits.astype(ms.float32).reshape(-1, vocab), flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights.reshape(-1).astype(ms.float32)).sum()
