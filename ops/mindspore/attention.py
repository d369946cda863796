"""Attention kernels of the MindSpore backend: an eager reference and Ascend's fused flash attention.

Both take heads-first tensors and the same description of who may attend to whom, so a caller
switches kernels without rebuilding its inputs:

* `eager_attention` (any device; the CPU path): softmax(q k^T * scale + additive_mask) v in fp32,
  grouped-query heads repeated. This is the reference the flash kernels are tested against.
* `flash_attention_bnsd` (Ascend): `ops.flash_attention_score` in BNSD layout with a bool mask
  (True = masked), for padded batches.
* `flash_attention_tnd` (Ascend): `ops.flash_attention_score` in TND layout with cumulative
  sequence ends, for packed rows and the vision tower's windows (no [T, T] mask is ever built).

`ops.flash_attention_score` has no CPU kernel and takes only fp16/bf16, so the flash kernels cast to
`compute_dtype` and back. They cannot run on the CPU machines this repository is tested on; the unit
tests check the arguments they build against the eager kernel through a stand-in for the primitive.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops
import mindspore as ms

# Causal masks for the compressed sparse modes (2, 3) are always this size (documented by MindSpore).
_SPARSE_MASK_SIZE = 2048


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D], each key/value head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return ops.broadcast_to(x[:, :, None], (b, h, n_rep, length, d)).reshape(b, h * n_rep, length, d)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D], mask additive [B|1, 1|H, Lq, Lk] (0 or a large negative).

    Returns [B, H, Lq, D]. The softmax runs in fp32 whatever the input dtype, as transformers' eager
    attention does.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(q.dtype)
    return ops.matmul(probs, v)


def flash_attention_bnsd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, masked: Tensor | None, compute_dtype=ms.bfloat16
) -> Tensor:
    """Ascend: q [B, H, L, D], k/v [B, Hkv, L, D], `masked` bool [B, 1, L, L] (True = not attended).

    Grouped-query heads need no repeat: the kernel takes N2 dividing N1.
    """
    dtype = q.dtype
    out = ops.flash_attention_score(
        q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype), q.shape[1],
        attn_mask=masked, scalar_value=float(scale), input_layout="BNSD", sparse_mode=0,
    )
    return out.astype(dtype)


def causal_sparse_mask() -> Tensor:
    """The (2048, 2048) upper-triangular bool mask sparse_mode 3 (right-down causal) expects."""
    return Tensor(np.triu(np.ones((_SPARSE_MASK_SIZE, _SPARSE_MASK_SIZE), dtype=bool), k=1))


def flash_attention_tnd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: np.ndarray, causal: bool, compute_dtype=ms.bfloat16
) -> Tensor:
    """Ascend, packed: q [T, H, D], k/v [T, Hkv, D], `cu_seqlens` [N+1] (0, end_1, ..., T).

    Each sequence attends only within itself (causal or not); MindSpore takes the cumulative ends
    without the leading 0.
    """
    ends = [int(e) for e in np.asarray(cu_seqlens)[1:]]
    dtype = q.dtype
    out = ops.flash_attention_score(
        q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype), q.shape[1],
        attn_mask=causal_sparse_mask() if causal else None,
        actual_seq_qlen=ends, actual_seq_kvlen=ends, scalar_value=float(scale),
        next_tokens=0 if causal else 2147483647, input_layout="TND", sparse_mode=3 if causal else 0,
    )
    return out.astype(dtype)
