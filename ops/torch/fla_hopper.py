"""fla's gated `chunk_bwd_dqkwg` in torch, registered as an fla backend where fla refuses its own kernel.

fla-core's chunked gated delta rule backward calls one kernel, `chunk_bwd_dqkwg`, that Triton >= 3.4 and
< 3.7.1 miscompiles on Hopper (fla #640); fla then raises unless tilelang (a 50 MB wheel with its own
compiler) is installed. The lent H100 image's torch 2.11 ships Triton 3.6.0. Rather than give up fla's
forward and the rest of its backward (all correct there), vltune registers this torch port of that one
kernel through fla's own backend registry (`fla.backends.register('common')`), only on that combination
and only when tilelang is not usable. Every other fla kernel, and users with a current Triton, are
untouched.

The kernel is local to each chunk of 64 tokens: given the chunk-start states `h` and their gradients
`dh` (from fla's other kernels), it returns dq, dk, dw and the pre-cumsum dg. The port gathers every
chunk (of every sequence of a packed row, via fla's `chunk_indices`) into a batch [N, HV, 64, ...] and
does the kernel's arithmetic with batched matmuls in fp32, the [64, 64] score gradient rounded to the
inputs' dtype as the kernel rounds it. tests/unit/ops/test_fla_hopper.py compares it with the Triton
kernel run by Triton's interpreter on the CPU; tools/gpu/gdn_check.py compares fla's whole gradient
with the port in place against the torch reference on the GPU.
"""

from __future__ import annotations

import functools

import torch


def _chunk_layout(batch: int, length: int, chunk: int, cu_seqlens: torch.Tensor | None,
                  chunk_indices: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token index [N, chunk] into the flattened [B * T] tokens, valid [N, chunk]) of every chunk, in the
    order fla numbers them (its `h` / `dh` rows)."""
    if cu_seqlens is None:
        chunks = -(-length // chunk)
        starts = (torch.arange(batch, device=device)[:, None] * length
                  + torch.arange(chunks, device=device)[None, :] * chunk).reshape(-1)
        ends = (torch.arange(batch, device=device)[:, None] * length + length).expand(batch, chunks).reshape(-1)
    else:
        if chunk_indices is None:
            from fla.ops.utils import prepare_chunk_indices

            chunk_indices = prepare_chunk_indices(cu_seqlens, chunk)
        pairs = chunk_indices.reshape(-1, 2).long()
        cu = cu_seqlens.long()
        starts = cu[pairs[:, 0]] + pairs[:, 1] * chunk
        ends = cu[pairs[:, 0] + 1]
    index = starts[:, None] + torch.arange(chunk, device=device)[None, :]
    valid = index < ends[:, None]
    return torch.where(valid, index, starts[:, None]), valid


def chunk_bwd_dqkwg_torch(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None, state_v_first=False,
                          cu_seqlens=None, chunk_size=64, chunk_indices=None):
    """fla.ops.common.chunk_o.chunk_bwd_dqkwg for the gated case (g given, no g_gamma): same arguments,
    same results (dq, dk [B, T, H, K], dw like w or None, dg [B, T, HV] fp32)."""
    if g is None or g_gamma is not None:
        raise NotImplementedError("the torch chunk_bwd_dqkwg covers the gated case (g, no g_gamma)")
    batch, length, heads, dim_k = k.shape
    value_heads, dim_v = v.shape[2], v.shape[3]
    group = value_heads // heads
    scale = dim_k ** -0.5 if scale is None else scale
    index, valid = _chunk_layout(batch, length, chunk_size, cu_seqlens, chunk_indices, k.device)
    n = index.shape[0]

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, heads, D] -> [N, heads, chunk, D], fp32, 0 outside
        rows = x.reshape(batch * length, x.shape[2], -1)[index].float()
        return (rows * valid[:, :, None, None]).transpose(1, 2)

    def states(x: torch.Tensor) -> torch.Tensor:  # [.., N, HV, K, V] (or [V, K]) -> [N, HV, K, V] fp32
        x = x.reshape(n, value_heads, *((dim_v, dim_k) if state_v_first else (dim_k, dim_v))).float()
        return x.transpose(-1, -2) if state_v_first else x

    qc = chunks(q).repeat_interleave(group, dim=1)
    kc = chunks(k).repeat_interleave(group, dim=1)
    vc, doc = chunks(v), chunks(do)
    hc, dhc = states(h), states(dh)
    gc = g.reshape(batch * length, value_heads)[index].float().transpose(1, 2)  # [N, HV, chunk]
    last = (valid.sum(1) - 1)[:, None, None].expand(n, value_heads, 1)
    g_last = gc.gather(2, last)  # [N, HV, 1]
    inside = valid[:, None, :]  # [N, 1, chunk]

    dg_last = (hc * dhc).sum((-1, -2)) * torch.exp2(g_last[..., 0])
    dq = (doc @ hc.transpose(-1, -2)) * torch.exp2(gc)[..., None] * scale
    dk = (vc @ dhc.transpose(-1, -2)) * torch.where(inside, torch.exp2(g_last - gc), 0.0)[..., None]
    dw = -(chunks(dv) @ hc.transpose(-1, -2)) if w is not None else None
    dg_last = dg_last + (dk * kc).sum((-1, -2))

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=k.device).tril()
    pairs = causal & inside[..., :, None] & inside[..., None, :]
    ds = torch.where(pairs, (doc @ vc.transpose(-1, -2)) * torch.exp2(gc[..., :, None] - gc[..., None, :]), 0.0) * scale
    ds = ds.to(k.dtype).float()  # the kernel rounds the score gradient to the inputs' dtype before its matmuls
    dq = dq + ds @ kc
    dk = dk + ds.transpose(-1, -2) @ qc
    dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)
    dg = dg.scatter_add(2, last, dg_last[..., None])

    def scatter(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # [N, HV, chunk, D] -> [B, T, HV, D]
        out = torch.zeros(batch * length, value_heads, x.shape[-1], dtype=dtype, device=x.device)
        out[index[valid]] = x.transpose(1, 2)[valid].to(dtype)
        return out.view(batch, length, value_heads, -1)

    dq, dk = scatter(dq, q.dtype), scatter(dk, k.dtype)
    if heads != value_heads:
        dq = dq.view(batch, length, heads, group, dim_k).sum(3)
        dk = dk.view(batch, length, heads, group, dim_k).sum(3)
    dw = scatter(dw, w.dtype) if dw is not None else None
    return dq, dk, dw, scatter(dg[..., None], torch.float32)[..., 0]


def needs_port() -> bool:
    """fla's Hopper guard would refuse its gated backward here and no tilelang can take over."""
    from fla.backends import TileLangBackend
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1 and not TileLangBackend.is_available())


@functools.cache
def ensure_registered(force: bool = False) -> bool:
    """Register the port as fla's 'common' backend for chunk_bwd_dqkwg if `needs_port()` (or `force`);
    returns whether it is registered. Once per process."""
    if not (force or needs_port()):
        return False
    from fla.backends import BaseBackend, register

    @register("common")
    class VltuneTorchBackend(BaseBackend):
        backend_type = "vltune_torch"
        priority = 1  # before tilelang (5), which is not usable here anyway

        def chunk_bwd_dqkwg_verifier(self, *args, g=None, g_gamma=None, **kwargs):
            if g is None or g_gamma is not None:
                return False, "vltune's torch port covers the gated case only"
            return True, None

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return chunk_bwd_dqkwg_torch(*args, **kwargs)

    return True
