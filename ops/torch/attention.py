"""Variable-length ("varlen") attention: sub-sequences laid end to end in one row, attending only inside
themselves, in one call per layer, with whichever kernel this machine has.

Packed training rows and Qwen2.5-VL's windowed vision tower both need attention over many short
sequences. Padding them to a batch wastes compute; transformers' sdpa path on a packed row builds a
dense L x L mask (no flash kernel), and its vision tower launches one attention per window (about 2k
tiny kernels per 1008^2 image). flash-attn is optional in vltune (DESIGN.md: packing must work
without it), so the kernels are tried in this order:

    flash_attn    flash-attn's `flash_attn_varlen_func`          CUDA, fp16/bf16, if installed
    aten_flash    the FA2 op under torch's varlen_attn, called    CUDA, fp16/bf16, torch >= 2.10
                  directly (`aten::_flash_attention_forward`)
    torch_varlen  `torch.nn.attention.varlen.varlen_attn`        CUDA, fp16/bf16, torch >= 2.10
    fa4           FlashAttention-4 (flash-attn-4, CuTe DSL)       sm90+ (Hopper, Blackwell), fp16/bf16, if installed
    flex          FlexAttention with a document block mask       CUDA (compiled), any dtype; CPU on request
    sdpa          `scaled_dot_product_attention` per sub-sequence anywhere (the CPU path)

On an Ascend NPU (torch_npu, optional) the table is `npu_fusion` (`torch_npu.npu_fusion_attention` in
TND layout, grouped-query K/V as they are, any dtype the installed CANN takes) then `sdpa`; the CUDA
kernels above are never offered there, nor `npu_fusion` anywhere else.

and `reference` (a dense block-diagonal mask, fp32 softmax) is the eager definition the others are
tested against. `fa4` comes after torch's own FA2 (so "auto" picks it only without torch >= 2.10 and
flash-attn) although its kernels are faster: on an H100 its forward over a Qwen2.5-VL-3B row's
full-attention vision segments ran at 550 TFLOP/s against FA2's 255, but issuing a text layer's forward
and backward through it took 0.9-1.4 ms of host time (FA2 through aten: 0.3-0.6 ms), and the compiled
3B step, whose host is about as busy as its GPU, ran 207.9 against 205.5 ms per row with it
(docs/performance.md). Pick it with VLTUNE_VARLEN_BACKEND=fa4.

All take q [T, Hq, D], k/v [T, Hkv, D] (Hq a multiple of Hkv: grouped-query attention) and int32
`cu_seqlens` [N+1], and return [T, Hq, D].
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from typing import Callable

import torch
import torch.nn.functional as F

from .memo import PerTensor

BACKENDS = ("flash_attn", "aten_flash", "torch_varlen", "fa4", "npu_fusion", "flex", "sdpa", "reference")
BACKEND_ENV = "VLTUNE_VARLEN_BACKEND"
"""Environment override of the automatic choice (benchmarks and tests compare kernels with it)."""

_HALF = (torch.float16, torch.bfloat16)


def _load_torch_varlen() -> tuple[Callable | None, frozenset[str]]:
    """torch's `varlen_attn` (None before torch 2.10) and its keywords, which moved between releases: the
    first takes `is_causal` and no `scale`, 2.10+ `scale` and `window_size`, and `enable_gqa` arrived
    later (without it, K/V heads are repeated)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _fa4_installed() -> bool:
    """flash-attn-4 ships `flash_attn/cute/`. Found without importing `flash_attn`: that package may be
    FA2's, whose import loads its CUDA extension (and fails outright on an ABI mismatch)."""
    spec = importlib.util.find_spec("flash_attn")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isfile(os.path.join(location, "cute", "interface.py")) for location in locations)


# Looked up once, at import: the call path below runs inside torch.compile'd decoder layers. With the
# lookups (import, `find_spec`, `inspect.signature` behind functools caches) in that path, torch 2.11
# split each compiled 3B decoder layer into six regions; with them here, into one (docs/design-notes.md;
# which lookup broke the graph was not isolated).
_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn_2_cuda") is not None  # FA2's extension, not FA4's package
_FA4_INSTALLED = _fa4_installed()
_TORCH_VARLEN, _TORCH_VARLEN_PARAMS = _load_torch_varlen()


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The kernels usable for tensors on `device` of `dtype`, in the order "auto" prefers them (`reference` excluded)."""
    if device.type == "npu":
        return ["npu_fusion", "sdpa"]
    if device.type != "cuda":
        return ["sdpa", "flex"]  # flex runs on CPU unfused (a full score matrix): asked for, never picked
    out = []
    if dtype in _HALF and _FLASH_ATTN_INSTALLED:
        out.append("flash_attn")
    if dtype in _HALF and _TORCH_VARLEN is not None:
        out += ["aten_flash", "torch_varlen"]
    # FA4 has forward and backward kernels for sm90 (Hopper) and sm100+ only. get_device_properties
    # is constant-folded by torch.compile (no graph break in the compiled layers).
    if dtype in _HALF and _FA4_INSTALLED and torch.cuda.get_device_properties(device).major >= 9:
        out.append("fa4")
    return out + ["flex", "sdpa"]


def select_backend(query: torch.Tensor, backend: str = "auto") -> str:
    """`backend`, or for "auto" the environment override or the fastest usable kernel for `query`."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
    if backend == "auto":
        return available_backends(query.device, query.dtype)[0]
    if backend not in BACKENDS:
        raise ValueError(f"varlen attention backend {backend!r} is not one of {', '.join(('auto',) + BACKENDS)}")
    if backend != "reference" and backend not in available_backends(query.device, query.dtype):
        raise ValueError(
            f"varlen attention backend {backend!r} cannot run {query.dtype} tensors on {query.device}; "
            f"usable here: {', '.join(available_backends(query.device, query.dtype))}"
        )
    return backend


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over k, v [T, Hkv, D] inside each sub-sequence `cu_seqlens[i]:cu_seqlens[i+1]`.

    `max_seqlen` is the longest sub-sequence (flash kernels size their grid by it; pass it from the
    batch instead of reading it off the device). `causal`: each token sees its own sub-sequence's
    earlier tokens only. Returns [T, Hq, D] in the query's dtype.
    """
    if query.ndim != 3 or key.ndim != 3 or value.ndim != 3:
        raise ValueError(f"varlen attention takes [T, H, D] tensors, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads {query.shape[1]} are not a multiple of key/value heads {key.shape[1]}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    cu_seqlens = cu_seqlens.to(query.device, torch.int32)
    return _KERNELS[select_backend(query, backend)](query, key, value, cu_seqlens, int(max_seqlen), causal, scale)


# -- kernels -------------------------------------------------------------------------------------


def _flash_attn(q, k, v, cu, max_len, causal, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=causal)


@torch.library.custom_op("vltune::fa4_varlen_forward", mutates_args=())
def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's forward as one opaque op: its Python interface (argument checks, the CuTe kernel cache, the
    TVM-FFI launch) stays out of torch.compile's trace, and its autograd.Function with it."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                               softmax_scale=scale, causal=causal, return_lse=True)[:2]
    return out, lse


@_fa4_forward.register_fake
def _(q, k, v, cu, max_len, causal, scale):
    # FA4 allocates its outputs contiguous whatever q's strides: out [T, H, Dv], lse [H, T] in fp32.
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("vltune::fa4_varlen_backward", mutates_args=())
def _fa4_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  cu: torch.Tensor, max_len: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad, lse, scale, causal, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=max_len, max_seqlen_k=max_len)
    return dq, dk, dv


@_fa4_backward.register_fake
def _(grad, q, k, v, out, lse, cu, max_len, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as FA4 allocates them


def _fa4_save(ctx, inputs, output):
    q, k, v, cu, max_len, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)
    ctx.args = (max_len, causal, scale)


def _fa4_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(grad_out.contiguous(), q, k, v, out, lse, cu, *ctx.args)
    return dq, dk, dv, None, None, None, None


_fa4_forward.register_autograd(_fa4_grad, setup_context=_fa4_save)


def _fa4(q, k, v, cu, max_len, causal, scale):
    """FlashAttention-4 (the CuTe DSL kernels of `pip install flash-attn-4`): its sm90/sm100 forward and
    backward, compared with FA2 on the bench's rows by tools/gpu/attention_kernels.py."""
    return _fa4_forward(q, k, v, cu, max_len, causal, scale)[0]


def _aten_flash(q, k, v, cu, max_len, causal, scale):
    """The kernel torch's `varlen_attn` runs, without its Python custom op around it: that wrapper costs
    about 0.25 ms of host time per call (forward and backward alike, plus a kernel to zero an unused
    RNG state), some 25 ms per 4096-token row of a 3B model, which a compiled step cannot hide. The
    aten op is C++ with its own derivative (FA2's backward), takes grouped-query K/V as they are."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, causal, False, scale=scale)[0]


def _torch_varlen(q, k, v, cu, max_len, causal, scale):
    params = _TORCH_VARLEN_PARAMS
    extra: dict = {"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in params else {"is_causal": causal}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "scale" in params:
        extra["scale"] = scale
    else:  # the kernel's own 1/sqrt(D): fold the wanted scale into q
        q = q * (scale * q.shape[-1] ** 0.5)
    return _TORCH_VARLEN(q, k, v, cu, cu, max_len, max_len, **extra)


NPU_MASK_SIZE = 2048
"""sparse_mode 3 takes its causal mask compressed: always this square, whatever the sequence lengths."""

_npu_causal_masks: dict[torch.device, torch.Tensor] = {}

_npu_sequence_ends = PerTensor(lambda cu: [int(end) for end in cu[1:].tolist()])
"""The kernel takes the sub-sequences' cumulative ends as a host list without the leading 0; every layer
of a forward passes the same cu_seqlens, so that device read happens once per forward, not per layer."""


def npu_causal_mask(device: torch.device) -> torch.Tensor:
    """The [2048, 2048] bool mask, True above the diagonal (= not attended), that `npu_fusion_attention`'s
    sparse_mode 3 (right-down causal, per sub-sequence in TND layout) reads its causal pattern from."""
    if device not in _npu_causal_masks:
        ones = torch.ones(NPU_MASK_SIZE, NPU_MASK_SIZE, dtype=torch.bool, device=device)
        _npu_causal_masks[device] = ones.triu(diagonal=1)
    return _npu_causal_masks[device]


def _npu_fusion(q, k, v, cu, max_len, causal, scale):
    """Ascend's fused attention (torch_npu, CANN's FlashAttentionScore) over the packed row in TND layout:
    q [T, N1, D], k/v [T, N2, D] with N2 dividing N1, each sub-sequence attending inside itself. It
    returns (out, softmax_max, softmax_sum, softmax_out, seed, offset, numels); torch_npu defines its
    backward. Not importable without torch_npu, which any tensor on an `npu` device implies."""
    import torch_npu

    ends = _npu_sequence_ends(cu)
    return torch_npu.npu_fusion_attention(
        q, k, v, q.shape[1], "TND",
        atten_mask=npu_causal_mask(q.device) if causal else None, scale=scale, keep_prob=1.0,
        actual_seq_qlen=ends, actual_seq_kvlen=ends, sparse_mode=3 if causal else 0,
    )[0]


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the sub-sequence each token belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


_block_masks: list[tuple[torch.Tensor, bool, object]] = []
"""Recent (cu_seqlens, causal, BlockMask): every layer of a forward passes the same cu_seqlens tensor, so
the mask is built once per forward, not per layer. Holding the tensor keeps its identity unique."""


def _document_block_mask(cu: torch.Tensor, total: int, causal: bool, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    for tensor, is_causal, mask in _block_masks:
        if tensor is cu and is_causal == causal:
            return mask
    doc = document_ids(cu, total)

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    mask = create_block_mask(mask_mod, None, None, total, total, device=device)
    _block_masks[:] = [(cu, causal, mask)] + _block_masks[:3]
    return mask


def _flex(q, k, v, cu, max_len, causal, scale):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _document_block_mask(cu, q.shape[0], causal, q.device)
    attend = _compiled_flex() if q.is_cuda else flex_attention  # CPU: the unfused eager path (tests)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = attend(q4, k4, v4, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _sdpa(q, k, v, cu, max_len, causal, scale):
    lengths = (cu[1:] - cu[:-1]).tolist()
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for qs, ks, vs in zip(*(t.split(lengths) for t in (q, k, v))):
        if qs.shape[0] == 0:
            outs.append(qs)
            continue
        # [1, H, l, D]: SDPA's fused kernels (flash, memory-efficient) take 4-D inputs only, 3-D ones get the math kernel.
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs))
        o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def varlen_attention_reference(q, k, v, cu, max_len, causal, scale):
    """The definition: softmax(q k^T * scale + block-diagonal (causal) mask) v, in fp32."""
    total = q.shape[0]
    doc = document_ids(cu, total)
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(total, total, dtype=torch.bool, device=q.device).tril()
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v.float()).to(q.dtype)


_KERNELS: dict[str, Callable] = {
    "flash_attn": _flash_attn,
    "aten_flash": _aten_flash,
    "torch_varlen": _torch_varlen,
    "fa4": _fa4,
    "npu_fusion": _npu_fusion,
    "flex": _flex,
    "sdpa": _sdpa,
    "reference": varlen_attention_reference,
}
