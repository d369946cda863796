"""The Gated DeltaNet's two sequence kernels over packed rows: a causal depthwise conv and the chunked
gated delta rule, each restarting at every sub-sequence of `cu_seqlens`.

A packed row lays samples end to end; a recurrent layer that runs over it as one sequence carries its
state and its conv window from one sample into the next (transformers' torch path takes `cu_seqlens`
in `**kwargs` and ignores it). Two implementations, picked per call:

    fla    flash-linear-attention (`fla-core`, Triton): `chunk_gated_delta_rule` and `causal_conv1d`, both
           varlen through `cu_seqlens`. CUDA, if installed. On Hopper with Triton >= 3.4 and < 3.7.1 fla
           refuses its gated `chunk_bwd_dqkwg` (a miscompile, fla #640) unless tilelang is there;
           `ops/torch/fla_hopper.py` then registers a torch port of that one kernel as fla's backend.
    torch  the samples gathered into a right-padded batch [N, L_max] and run through the model file's
           own `torch_chunk_gated_delta_rule` and a depthwise `conv1d` with left zero padding. Exact:
           both are causal, so the padding after a sample never reaches its tokens, and each sample
           starts from a zero state and a zero window. Any device (the CPU path).

Layouts follow fla: x [1, T, C], q/k [1, T, H, Dk], v [1, T, HV, Dv], g/beta [1, T, HV]; `cu_seqlens`
int [N+1] on the tensors' device.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch
import torch.nn.functional as F

from .memo import PerTensor

BACKENDS = ("fla", "torch")
BACKEND_ENV = "VLTUNE_GDN_BACKEND"
"""Environment override of the automatic choice ("fla" or "torch"), as VLTUNE_VARLEN_BACKEND for attention."""

_FLA_INSTALLED = importlib.util.find_spec("fla") is not None


def select_backend(x: torch.Tensor) -> str:
    """fla on CUDA when installed, else torch; VLTUNE_GDN_BACKEND forces one (an error if it cannot run)."""
    forced = os.environ.get(BACKEND_ENV, "auto")
    if forced not in ("auto", *BACKENDS):
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected auto, {' or '.join(BACKENDS)}")
    usable = x.device.type == "cuda" and _FLA_INSTALLED
    if forced == "fla" and not usable:
        raise RuntimeError(f"{BACKEND_ENV}=fla needs fla-core installed and CUDA tensors (got {x.device.type})")
    if forced != "auto":
        return forced
    return "fla" if usable else "torch"


def segment_layout(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [N, L_max] into the row, valid [N, L_max]) of the right-padded batch of a packed row's samples."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=cu.device)
    valid = offsets[None, :] < lengths[:, None]
    index = (cu[:-1, None] + offsets[None, :]).clamp(max=int(cu[-1]) - 1)
    return index, valid


_segment_layouts = PerTensor(segment_layout)
"""The torch path's layout, once per forward (each layer's conv and delta rule use it)."""


def _to_segments(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[1, T, ...] -> [N, L_max, ...], zeros after each sample."""
    out = x[0][index]
    return out * valid.view(*valid.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def _conv_torch(x, weight, bias, activation, cu_seqlens):
    index, valid = _segment_layouts(cu_seqlens)
    segments = _to_segments(x, index, valid).transpose(1, 2)  # [N, C, L_max]
    channels, width = weight.shape
    out = F.conv1d(segments.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=channels)
    out = out[..., : segments.shape[-1]]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal conv activation {activation!r}: silu or none")
    return out.transpose(1, 2)[valid].unsqueeze(0).to(x.dtype)


_host_copies = PerTensor(lambda cu_seqlens: (cu_seqlens.to(torch.long), cu_seqlens.to("cpu", torch.long)))
"""The int64 device tensor and a CPU copy of a packed row's `cu_seqlens`, once per forward: fla derives its
chunk layout from the CPU copy without reading the device (twice per layer and step otherwise)."""


def _conv_fla(x, weight, bias, activation, cu_seqlens):
    from fla.modules.causal_conv1d import causal_conv1d

    # under autocast the projection's output is bf16 while the conv's parameters stay fp32: the kernel takes one dtype
    weight, bias = weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None
    cu, cu_host = _host_copies(cu_seqlens)
    out, _ = causal_conv1d(x, weight, bias, activation=activation, cu_seqlens=cu, cu_seqlens_cpu=cu_host)
    return out


@torch.compiler.disable  # data-dependent segment layout (torch path) / Triton kernels (fla): run eagerly in compiled layers
def causal_conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                         cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv of x [1, T, C] with weight [C, W], restarting at every sample; [1, T, C]."""
    return (_conv_fla if select_backend(x) == "fla" else _conv_torch)(x, weight, bias, activation, cu_seqlens)


def _rule_torch(q, k, v, g, beta, cu_seqlens, reference: Callable):
    index, valid = _segment_layouts(cu_seqlens)
    segments = [_to_segments(t, index, valid) for t in (q, k, v, g, beta)]
    out, _ = reference(*segments[:3], g=segments[3], beta=segments[4], initial_state=None, output_final_state=False,
                       use_qk_l2norm_in_kernel=True)
    return out[valid].unsqueeze(0)


def prepare_fla_kernels() -> bool:
    """Import fla (when installed and a GPU is there) and put vltune's port of its Hopper-refused backward
    kernel in place where needed (ops/torch/fla_hopper.py); returns whether fla is usable."""
    if not (_FLA_INSTALLED and torch.cuda.is_available()):
        return False
    from .fla_hopper import ensure_registered

    ensure_registered()
    return True


def _rule_fla(q, k, v, g, beta, cu_seqlens, reference):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    prepare_fla_kernels()
    cu, cu_host = _host_copies(cu_seqlens)
    out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu,
                                    cu_seqlens_cpu=cu_host)
    return out


@torch.compiler.disable
def chunk_gated_delta_rule_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                                  cu_seqlens: torch.Tensor, reference: Callable) -> torch.Tensor:
    """The gated delta rule (q, k L2-normalised in the kernel, scale Dk**-0.5) over each sample of a packed
    row from a zero state; [1, T, HV, Dv]. `reference`: the model file's `torch_chunk_gated_delta_rule`,
    the torch path (its keywords are transformers', which fla's share)."""
    return (_rule_fla if select_backend(q) == "fla" else _rule_torch)(q, k, v, g, beta, cu_seqlens, reference)
