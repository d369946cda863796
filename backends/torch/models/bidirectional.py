"""Bidirectional text attention for masked diffusion on the stock transformers Qwen VL models.

Two switches, both needed (REFERENCE.md s4; a public Qwen3-VL MDLM fork set neither and trained a
causal model):

1. `is_causal = False` on every attention module of the language model. transformers' SDPA path
   computes `is_causal = q_len > 1 and attention_mask is None and module.is_causal`, and
   transformers drops an all-ones padding mask before attention ("allow_is_causal_skip"), so with
   the flag left on, an unpadded batch silently runs causal.
2. A 4D padding-only mask [B, 1, L, L] (every query sees every real key). transformers 5.x hands a
   4D mask to the layers as-is (masking_utils._preprocess_mask_arguments), so no causal triangle is
   ever built. SDPA takes a bool mask (True = attend); eager adds the mask to the scores, so it gets
   an additive float one.

The model code and weights are untouched; a checkpoint loads in stock transformers as before.
"""

from __future__ import annotations

import torch

from . import part


def text_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of the language model's decoder layers (peft-wrapped or not)."""
    return [layer.self_attn for layer in part(model, "decoder_layers")]


def make_bidirectional(model: torch.nn.Module) -> int:
    """Set is_causal = False on every text attention module; returns how many there were."""
    modules = text_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: found no text attention layers to make bidirectional")
    for module in modules:
        module.is_causal = False
    return len(modules)


def padding_only_mask(attention_mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, L] 1/0 padding mask -> [B, 1, L, L]: query i may attend key j iff j is a real token.

    Padded query rows still see the real keys, so no softmax row is empty (SDPA would return NaN).
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"expected a [B, L] padding mask, got shape {tuple(attention_mask.shape)}")
    keys = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    if attn_implementation == "sdpa":
        return keys
    if attn_implementation == "eager":
        mask = torch.zeros(keys.shape, dtype=dtype, device=attention_mask.device)
        return mask.masked_fill(~keys, torch.finfo(dtype).min)
    raise ValueError(f"bidirectional attention: attn_implementation {attn_implementation!r} is not one of sdpa, eager")
