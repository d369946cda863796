"""Packed rows and one-call vision attention on the stock transformers Qwen VL models.

Two hooks, neither editing transformers' model code nor the weights:

* Text: transformers 5 looks attention up by name in `AttentionInterface`. `enable_varlen` registers
  `vltune_varlen_{sdpa,eager}` and points the language model's config at it. With packing kwargs
  (`cu_seq_lens_q`, `max_length_q`: transformers' own names, which the model forwards to every
  attention call and which gradient checkpointing replays) it runs ops.torch.attention's varlen
  kernel over the packed row; without them (padded eval batches, generation with a KV cache) it is
  exactly the implementation it replaced, masks included (the same mask function is registered).
  A permanent switch rather than a context manager on purpose: non-reentrant checkpointing recomputes
  the forward inside backward(), after any context of the training step has closed.
  Under sequence parallelism (sequence_parallel.py) the call is wrapped in the all-to-all that trades
  this rank's tokens for this rank's heads.
* Recurrent layers (Qwen3.5's Gated DeltaNet): restarted at every sample of a packed row
  (linear_attention.py).
* Vision: each vision attention module's `forward` is replaced by one varlen call over the
  `cu_seqlens` the tower already passes (windows in Qwen2.5-VL's window layers, frames in its full
  layers and in Qwen3-VL), instead of the stock loop of one attention per window or frame.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from vltune.core.families import get_family
from vltune.ops.torch.attention import varlen_attention
from vltune.ops.torch.memo import PerTensor

from . import sequence_parallel
from .linear_attention import enable_varlen_linear_attention, linear_attention_varlen_ready
from .models import part, swap_forward

VARLEN_PREFIX = "vltune_varlen_"
FALLBACKS = ("sdpa", "eager")
"""The implementations a model may have had; padded batches keep using it."""


def _modeling_module(module: torch.nn.Module) -> types.ModuleType:
    return inspect.getmodule(type(module))


def _text_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    *, fallback: str, **kwargs):
    """AttentionInterface function. q [B, Hq, L, D], k/v [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:  # a padded batch: the replaced implementation, unchanged
        if fallback == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        eager = _modeling_module(module).eager_attention_forward
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    problems = []
    if query.shape[0] != 1:
        problems.append(f"a packed batch has one row, got {query.shape[0]}")
    if key.shape[2] != query.shape[2]:
        problems.append("a KV cache (packed rows are for training and scoring)")
    if attention_mask is not None:
        problems.append("an attention mask (packed rows carry cu_seqlens instead)")
    if dropout:
        problems.append(f"attention dropout {dropout}")
    if kwargs.get("sliding_window"):
        problems.append("sliding-window attention")
    if problems:
        raise NotImplementedError(f"varlen text attention: unsupported {'; '.join(problems)}")
    max_seqlen = kwargs.get("max_length_q")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    # Under autocast q/k leave the rotary in fp32 while v is bf16; sdpa is cast by autocast, these kernels are not.
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    group = sequence_parallel.active()
    if group is not None:  # this rank's tokens, every head -> every token, this rank's heads (and back)
        q, k, v = (group.seq_to_heads(t) for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=getattr(module, "is_causal", True), scale=scaling)
    if group is not None:
        out = group.heads_to_seq(out)
    return out.unsqueeze(0), None


def _sdpa_mask_unless_unpadded(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    """sdpa's mask function, except that a square call without a padding mask gets None.

    Such a call is a causal row, which sdpa runs with `is_causal` anyway, or a packed row: transformers
    reads packing from 1-D position ids that restart (a Qwen3 language model, Ovis2.5's) and builds an
    L x L block mask, which the varlen kernel does not take; the packed row's own `cu_seqlens` say the same."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


@functools.cache
def register_varlen_implementations() -> tuple[str, ...]:
    """Register `vltune_varlen_sdpa` / `_eager` with transformers (attention function and mask function)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    names = []
    for fallback in FALLBACKS:
        name = VARLEN_PREFIX + fallback
        AttentionInterface.register(name, functools.partial(_text_attention, fallback=fallback))
        mask = _sdpa_mask_unless_unpadded if fallback == "sdpa" else ALL_MASK_ATTENTION_FUNCTIONS[fallback]
        AttentionMaskInterface.register(name, mask)
        names.append(name)
    return tuple(names)


_max_length = PerTensor(lambda cu_seqlens: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
"""max(diff(cu_seqlens)): the tower passes the same two tensors (windows, full) to every layer, so one
device-to-host read per tensor and forward instead of one per layer."""


def _varlen_vision(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], max_seqlen: int | None) -> torch.Tensor:
    """Rotary (the modeling file's `apply_rotary_pos_emb_vision`) then one varlen call: [T, H, D] -> [T, H*D]."""
    cos, sin = position_embeddings
    q, k = _modeling_module(self).apply_rotary_pos_emb_vision(q, k, cos, sin)
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
    max_seqlen = max_seqlen if max_seqlen is not None else _max_length(cu_seqlens)
    out = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens, max_seqlen, causal=False, scale=self.scaling)
    return out.reshape(q.shape[0], -1)


def _vision_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                              max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """Qwen2.5-VL / Qwen3-VL vision attention (fused `qkv`, `proj`), [T, C] -> [T, C], as one varlen call
    over `cu_seqlens`.

    The same projections and rotary as the stock forward, so LoRA on the vision blocks keeps working.
    `kwargs` (the language model's packing arguments, forwarded to the tower by the model) are not the tower's.
    """
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return self.proj(_varlen_vision(self, q, k, v, cu_seqlens, position_embeddings, max_seqlen))


def _vision_attention_forward_split(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                                    max_seqlen: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Ovis2.5's SigLIP2 attention (`q_proj`/`k_proj`/`v_proj`, `out_proj`; returns (output, weights)) as one
    varlen call; the stock forward runs one attention per image (or window) under sdpa."""
    shape = (hidden_states.shape[0], self.num_heads, self.head_dim)
    q, k, v = (proj(hidden_states).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
    return self.out_proj(_varlen_vision(self, q, k, v, cu_seqlens, position_embeddings, max_seqlen)), None


def vision_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of the vision tower's blocks; `model` is the VL model or the tower itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "blocks"):  # a Qwen tower on its own
        return [block.attn for block in base.blocks]
    modules = get_family(base.config.model_type).modules
    return [getattr(block, modules.vision_attention) for block in part(base, "vision_blocks")]


def enable_varlen_vision(model: torch.nn.Module) -> int:
    """One varlen call per vision layer (the VL model or its tower alone); idempotent; returns the layer count."""
    attentions = vision_attention_modules(model)
    fused = [a for a in attentions if hasattr(a, "qkv")]
    split = [a for a in attentions if not hasattr(a, "qkv")]
    return swap_forward(fused, _vision_attention_forward) + swap_forward(split, _vision_attention_forward_split)


def text_config(model: torch.nn.Module):
    return part(model, "llm").config


def enable_varlen(model: torch.nn.Module, vision: bool = True) -> str:
    """Switch the text attention to the varlen-capable implementation and (with `vision`) the vision
    attention to one varlen call per layer. Idempotent; returns the text implementation's name."""
    register_varlen_implementations()
    config = text_config(model)
    current = config._attn_implementation
    if not current.startswith(VARLEN_PREFIX):
        if current not in FALLBACKS:
            raise ValueError(
                f"packed batches need attn_implementation sdpa or eager (vltune brings its own varlen kernels), got {current!r}"
            )
        config._attn_implementation = VARLEN_PREFIX + current
    enable_varlen_linear_attention(model)
    if vision:
        enable_varlen_vision(model)
    return config._attn_implementation


def require_varlen(model: torch.nn.Module | None) -> None:
    """Raise unless `model`'s text attention honours packing arguments (stock sdpa/eager silently ignore them)."""
    if model is None or not text_config(model)._attn_implementation.startswith(VARLEN_PREFIX):
        raise RuntimeError(
            "a packed batch (cu_seqlens) needs a model through backends.torch.attention.enable_varlen; "
            "its stock attention would let the packed samples attend to each other"
        )
    if not linear_attention_varlen_ready(model):
        raise RuntimeError(
            "a packed batch (cu_seqlens) needs the model's recurrent (Gated DeltaNet) layers through "
            "backends.torch.attention.enable_varlen; the stock ones carry their state from one sample into the next"
        )
