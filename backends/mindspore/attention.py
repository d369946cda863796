"""Which kernels the MindSpore models run, chosen by device target, and the attention they call.

The models never test the device themselves: they receive a `Kernels` record built here from
`mindspore.get_context("device_target")` and call `text_attention` / `vision_attention` /
`rms_norm`, which dispatch on it.

* CPU (and GPU): fp32 classic `ops`, an eager masked attention (ops/mindspore/attention.py), the
  RMSNorm written out. This is what runs and is tested here.
* Ascend: `ops.flash_attention_score` (BNSD with a bool mask for padded batches, TND with cumulative
  lengths for packed batches and the vision tower), the fused `ops.rms_norm`, bf16 compute. These
  kernels exist only on Ascend; on the CPU machines of this project they are exercised only through
  a stand-in for the primitive that checks the arguments (tests/unit/mindspore/test_ms_dispatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from vltune.ops.mindspore import attention as kernels_impl

NEG_INF = float(np.finfo(np.float32).min)  # what transformers adds for a masked score


@dataclass(frozen=True)
class Kernels:
    """The kernel choice of one model instance."""

    attention: str = "eager"
    """eager (any device) | flash (Ascend's ops.flash_attention_score)."""
    rms_norm: str = "eager"
    """eager (written out in fp32) | fused (Ascend's ops.rms_norm)."""
    flash_dtype: object = ms.bfloat16
    """The dtype the flash kernel computes in (it takes only fp16/bf16)."""


KERNELS_BY_DEVICE = {
    "Ascend": Kernels(attention="flash", rms_norm="fused"),
    "CPU": Kernels(),
    "GPU": Kernels(),
}


def kernels_for(device_target: str | None = None) -> Kernels:
    """The kernels for `device_target` (default: the current MindSpore context's)."""
    target = device_target or ms.get_context("device_target")
    if target not in KERNELS_BY_DEVICE:
        raise ValueError(f"unknown MindSpore device_target {target!r}; expected one of {sorted(KERNELS_BY_DEVICE)}")
    return KERNELS_BY_DEVICE[target]


@dataclass
class TextAttentionLayout:
    """Who may attend to whom in one text forward, described once per batch (not per layer).

    Padded batch: `padding` [B, L] (1 = real token). Packed batch: `cu_seqlens` [N+1] with B == 1.
    `causal=False` is masked diffusion's bidirectional attention (padding still masked).

    Generation with a KV cache: the `length` queries follow `past_length` cached keys, so query i sits
    at key index past_length + i and `padding` covers all past_length + length keys (the prompt's left
    padding stays masked at every step).
    """

    batch_size: int
    length: int
    causal: bool = True
    padding: np.ndarray | None = None
    cu_seqlens: np.ndarray | None = None
    past_length: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.past_length and self.cu_seqlens is not None:
            raise ValueError("a KV cache (past_length > 0) needs a padded batch, not packed rows (cu_seqlens)")
        if self.past_length and not self.causal:
            raise ValueError("a KV cache is only valid for causal attention (earlier keys never see later tokens)")
        keys = self.past_length + self.length
        if self.padding is not None and tuple(self.padding.shape) != (self.batch_size, keys):
            raise ValueError(f"padding has shape {tuple(self.padding.shape)}, expected [B, past + L] = {(self.batch_size, keys)}")

    def allowed(self) -> np.ndarray:
        """bool [B, L, past_length + L]: query i may attend to key j."""
        b, n, past = self.batch_size, self.length, self.past_length
        ok = np.ones((b, n, past + n), dtype=bool)
        if self.causal:
            ok &= np.tril(np.ones((n, past + n), dtype=bool), k=past)[None]
        if self.padding is not None:
            ok &= self.padding.astype(bool)[:, None, :]
        if self.cu_seqlens is not None:
            seg = np.searchsorted(np.asarray(self.cu_seqlens)[1:], np.arange(n), side="right")
            ok &= (seg[:, None] == seg[None, :])[None]
        return ok

    def additive_mask(self) -> Tensor | None:
        """[B, 1, L, past + L] fp32, 0 where attended and NEG_INF elsewhere (None when nothing is masked)."""
        if "additive" not in self._cache:
            ok = self.allowed()
            self._cache["additive"] = None if ok.all() else Tensor(np.where(ok, 0.0, NEG_INF).astype(np.float32)[:, None])
        return self._cache["additive"]

    def masked(self) -> Tensor | None:
        """[B, 1, L, past + L] bool, True where *not* attended (flash_attention_score's convention).

        A query with nothing to attend to (a left-padding position under the causal mask, as generation
        batches have) is let attend to itself: a softmax over no key is NaN, and a NaN at a padded
        position would reach real rows through 0 * NaN in the next layer's probs @ v. Real rows never
        attend to padding, so what padded positions compute is never read. (The eager kernel's finite
        NEG_INF gives such rows a uniform softmax instead, as transformers' eager attention does.)
        """
        if "masked" not in self._cache:
            ok = self.allowed()
            rows, queries = np.nonzero(~ok.any(axis=-1))
            ok[rows, queries, self.past_length + queries] = True
            self._cache["masked"] = None if ok.all() else Tensor(~ok[:, None])
        return self._cache["masked"]


def text_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, layout: TextAttentionLayout, kernels: Kernels) -> Tensor:
    """q [B, H, L, D], k/v [B, Hkv, past + L, D] (cached keys first) -> [B, H, L, D]."""
    if kernels.attention == "eager":
        return kernels_impl.eager_attention(q, k, v, scale, layout.additive_mask())
    if layout.cu_seqlens is not None:  # packed: one row of concatenated sequences
        to_tnd = lambda x: x[0].swapaxes(0, 1)  # noqa: E731  [1, H, T, D] -> [T, H, D]
        out = kernels_impl.flash_attention_tnd(
            to_tnd(q), to_tnd(k), to_tnd(v), scale, layout.cu_seqlens, layout.causal, kernels.flash_dtype
        )
        return out.swapaxes(0, 1)[None]
    return kernels_impl.flash_attention_bnsd(q, k, v, scale, layout.masked(), kernels.flash_dtype)


def _equal_length_runs(cu_seqlens: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, n_segments, length) for each run of consecutive segments of one length."""
    lengths = np.diff(np.asarray(cu_seqlens))
    runs, i = [], 0
    while i < len(lengths):
        j = i
        while j + 1 < len(lengths) and lengths[j + 1] == lengths[i]:
            j += 1
        if lengths[i] > 0:
            runs.append((int(cu_seqlens[i]), j - i + 1, int(lengths[i])))
        i = j + 1
    return runs


def vision_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, cu_seqlens: np.ndarray, kernels: Kernels) -> Tensor:
    """Non-causal attention within each segment of cu_seqlens: q/k/v [N, H, D] -> [N, H, D].

    Eager: consecutive segments of equal length (the windows and frames of same-size images) are
    batched into one [n, H, len, D] attention without any mask, so the cost is sum(len^2), not N^2.
    """
    if kernels.attention == "flash":
        return kernels_impl.flash_attention_tnd(q, k, v, scale, cu_seqlens, causal=False, compute_dtype=kernels.flash_dtype)
    heads, dim = q.shape[1], q.shape[2]
    outs = []
    for start, count, length in _equal_length_runs(cu_seqlens):
        stop = start + count * length
        # [count*len, H, D] -> [count, H, len, D]
        block = [x[start:stop].reshape(count, length, heads, dim).swapaxes(1, 2) for x in (q, k, v)]
        out = kernels_impl.eager_attention(*block, scale)
        outs.append(out.swapaxes(1, 2).reshape(count * length, heads, dim))
    return outs[0] if len(outs) == 1 else ops.cat(outs, axis=0)


def rms_norm(x: Tensor, weight: Tensor, eps: float, kernels: Kernels) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32 (as transformers' Qwen RMSNorm)."""
    if kernels.rms_norm == "fused":
        return ops.rms_norm(x, weight, eps)[0]
    dtype = x.dtype
    h = x.astype(ms.float32)
    h = h * ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + eps)
    return weight * h.astype(dtype)
