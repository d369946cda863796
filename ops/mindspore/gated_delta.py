"""The Gated DeltaNet's two sequence kernels in MindSpore: a causal depthwise conv and the chunked gated
delta rule, each restarting at every sub-sequence of a packed row's `cu_seqlens`.

A packed row lays samples end to end; a recurrent layer run over it as one sequence would carry its
state and its conv window from one sample into the next. `*_varlen` gathers the samples of a packed row
into a right-padded batch [N, L_max] (host-side index from `cu_seqlens`), runs the kernel on it and
gathers the real positions back. Exact: both kernels are causal, so the padding after a sample never
reaches its tokens, and each sample starts from a zero state and a zero window (as
ops/torch/gated_delta.py's torch path does).

The delta rule is transformers' `torch_chunk_gated_delta_rule` written in MindSpore operation by
operation (chunks of 64, the UT transform solved with a unit lower-triangular solve, then a scan over
the chunks), so its fp32 results agree with transformers' to rounding. `state` in and out lets
generation continue a sequence (prefill, then one token at a time).

Devices: MindSpore 2.10 has no fused gated-delta-rule or causal-conv1d primitive (neither in `ops`,
`mint` nor `ops.auto_generate`; on Ascend, MindSpeed-MM runs these through Triton kernels under
torch_npu, which MindSpore cannot call). Every operation used here (matmul, cumsum, exp,
`solve_triangular`, gather) has CPU and Ascend kernels, so this one eager path is both the CPU reference
and what runs on Ascend; it computes in fp32 whatever the input dtype, as transformers' torch path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.ops.auto_generate import solve_triangular  # not re-exported by mindspore.ops in 2.10

CHUNK = 64
"""Chunk length of the chunked rule (transformers' and fla's)."""

L2_EPS = 1e-6
"""q and k are L2-normalised in the kernel with this epsilon (fla's and transformers' `l2norm`)."""


# -- packed rows -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """The right-padded batch [N, L_max] of a packed row's N samples, built once per forward on the host."""

    index: Tensor
    """[N * L_max] int32: the row position each padded slot reads (clamped in range for the padding)."""
    valid: Tensor
    """[N, L_max] fp32: 1 at real positions, 0 after each sample."""
    flat_real: Tensor
    """[T] int32: where each row position sits in the flattened [N * L_max] batch."""
    shape: tuple[int, int]

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: np.ndarray) -> "Segments":
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        lengths = np.diff(cu)
        longest = int(lengths.max())
        offsets = np.arange(longest)
        valid = offsets[None, :] < lengths[:, None]
        index = np.minimum(cu[:-1, None] + offsets[None, :], cu[-1] - 1)
        return cls(
            Tensor(index.reshape(-1).astype(np.int32)), Tensor(valid.astype(np.float32)),
            Tensor(np.flatnonzero(valid.reshape(-1)).astype(np.int32)), (len(lengths), longest),
        )

    def gather(self, x: Tensor) -> Tensor:
        """[1, T, ...] -> [N, L_max, ...], zeros after each sample."""
        out = ops.gather(x[0], self.index, 0).reshape(*self.shape, *x.shape[2:])
        return out * self.valid.reshape(*self.shape, *([1] * (x.ndim - 2))).astype(out.dtype)

    def scatter(self, y: Tensor) -> Tensor:
        """[N, L_max, ...] -> [1, T, ...]: the real positions, in row order."""
        flat = y.reshape(self.shape[0] * self.shape[1], *y.shape[2:])
        return ops.gather(flat, self.flat_real, 0)[None]


# -- causal depthwise conv -------------------------------------------------------------------------------


def causal_conv1d(x: Tensor, weight: Tensor, activation: str | None = "silu", window: Tensor | None = None) -> Tensor:
    """Depthwise causal conv: x [B, T, C], weight [C, W] -> [B, T, C], out[t] = sum_j weight[:, j] x[t - W + 1 + j].

    `window` [B, W - 1, C]: the inputs before x (generation's conv state); zeros when None (a sequence
    start). Written as W shifted products, which CPU and Ascend both run without a grouped-conv kernel.
    """
    b, length, channels = x.shape
    width = weight.shape[1]
    dtype = x.dtype
    x = x.astype(weight.dtype)
    if window is None:
        window = ops.zeros((b, width - 1, channels), x.dtype)
    padded = ops.cat((window.astype(x.dtype), x), axis=1)
    out = padded[:, 0:length] * weight[:, 0]
    for j in range(1, width):
        out = out + padded[:, j : j + length] * weight[:, j]
    if activation in ("silu", "swish"):
        out = ops.silu(out)
    elif activation is not None:
        raise ValueError(f"causal conv activation {activation!r}: silu or none")
    return out.astype(dtype)


def conv_window(x: Tensor, width: int, window: Tensor | None = None) -> Tensor:
    """The last W - 1 inputs of (window, x) [B, W - 1, C]: the conv state after x."""
    if window is not None:
        x = ops.cat((window.astype(x.dtype), x), axis=1)
    elif x.shape[1] < width - 1:
        x = ops.cat((ops.zeros((x.shape[0], width - 1 - x.shape[1], x.shape[2]), x.dtype), x), axis=1)
    return x[:, x.shape[1] - (width - 1) :]


def causal_conv1d_varlen(x: Tensor, weight: Tensor, activation: str | None, segments: Segments | None) -> Tensor:
    """`causal_conv1d` restarting at every sample of a packed row (x [1, T, C]); plain when `segments` is None."""
    if segments is None:
        return causal_conv1d(x, weight, activation)
    return segments.scatter(causal_conv1d(segments.gather(x), weight, activation))


# -- gated delta rule --------------------------------------------------------------------------------------


def _l2norm(x: Tensor) -> Tensor:
    return x * ops.rsqrt((x * x).sum(-1, keepdims=True) + L2_EPS)


def chunk_gated_delta_rule(
    query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
    chunk_size: int = CHUNK,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule over whole sequences, q and k L2-normalised, q scaled by Dk**-0.5.

    query/key [B, T, H, Dk], value [B, T, HV, Dv] (HV a multiple of H: each q/k head serves HV / H
    consecutive value heads), g [B, T, HV] (log decay, <= 0), beta [B, T, HV]; `state` [B, HV, Dk, Dv]
    (None: zeros). Returns (out [B, T, HV, Dv] in value's dtype, final state fp32).
    """
    dtype = value.dtype
    b, length, heads, dk = key.shape
    value_heads, dv = value.shape[2], value.shape[3]
    if heads != value_heads:
        query = ops.repeat_interleave(query, value_heads // heads, 2)
        key = ops.repeat_interleave(key, value_heads // heads, 2)
    # [B, HV, T, D] and [B, HV, T]; q and k normalised together (PyNative pays per operation, not per element)
    qk = _l2norm(ops.stack((query, key)).swapaxes(2, 3).astype(ms.float32))
    q, k = qk[0] * dk**-0.5, qk[1]
    v = value.swapaxes(1, 2).astype(ms.float32)
    beta, decay = (t.swapaxes(1, 2).astype(ms.float32) for t in (beta, g))

    pad = (chunk_size - length % chunk_size) % chunk_size
    if pad:
        q, k, v = (ops.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, decay = (ops.pad(t, (0, pad)) for t in (beta, decay))
    chunks = (length + pad) // chunk_size
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (t.reshape(b, value_heads, chunks, chunk_size, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    cum = decay.reshape(b, value_heads, chunks, chunk_size).cumsum(-1)

    # pairwise[i, j] = exp(cum_i - cum_j) for j <= i: the decay between positions j and i of a chunk.
    upper = Tensor(np.triu(np.ones((chunk_size, chunk_size), dtype=bool), 1))
    diff = cum[..., :, None] - cum[..., None, :]
    pairwise = ops.exp(ops.where(upper, ops.full_like(diff, float("-inf")), diff))
    ut_system = ops.matmul(k_beta, k.swapaxes(-1, -2)) * pairwise
    intra = ops.matmul(q, k.swapaxes(-1, -2)) * pairwise
    decayed_k_beta = k_beta * ops.exp(cum)[..., None]
    # One unit lower-triangular solve for both right-hand sides (transformers solves them one by one).
    solved = solve_triangular(ut_system, ops.cat((v_beta, decayed_k_beta), axis=-1), lower=True, unit_diagonal=True)
    new_values, k_cumdecay = ops.split(solved, [dv, dk], axis=-1)

    q = q * ops.exp(cum)[..., None]
    k = k * ops.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = ops.exp(cum[..., -1])[..., None, None]
    per_chunk = [ops.unbind(t, 2) for t in (new_values, k_cumdecay, q, intra, chunk_decay, k.swapaxes(-1, -2))]
    outs = []
    for new_i, k_cumdecay_i, q_i, intra_i, decay_i, k_t_i in zip(*per_chunk):
        if state is None:  # a sequence start: nothing to read from the (zero) state
            v_new = new_i
            outs.append(ops.matmul(intra_i, v_new))
            state = ops.matmul(k_t_i, v_new)
            continue
        state = state.astype(ms.float32)
        v_new = new_i - ops.matmul(k_cumdecay_i, state)
        outs.append(ops.matmul(q_i, state) + ops.matmul(intra_i, v_new))
        state = state * decay_i + ops.matmul(k_t_i, v_new)
    out = outs[0] if chunks == 1 else ops.stack(outs, axis=2).reshape(b, value_heads, chunks * chunk_size, dv)
    if pad:
        out = out[:, :, :length]
    return out.swapaxes(1, 2).astype(dtype), state


def gated_delta_rule_varlen(
    query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, segments: Segments | None
) -> Tensor:
    """`chunk_gated_delta_rule` from a zero state for every sample of a packed row ([1, T, ...] inputs),
    or for every row of a batch when `segments` is None; the output only."""
    if segments is None:
        return chunk_gated_delta_rule(query, key, value, g, beta)[0]
    out, _ = chunk_gated_delta_rule(*(segments.gather(t) for t in (query, key, value, g, beta)))
    return segments.scatter(out)
