"""`MindSporeModel`: what the MindSpore backend needs to know about a family beyond its spec.

Each family with a native MindSpore model has one file in this folder, named after its model_type,
that defines `ENTRY`; a family without one has `capabilities.mindspore` False in core/families (the
conformance suite checks the two agree).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from vltune.core.families import get_family


@dataclass(frozen=True)
class MindSporeModel:
    cls: Any
    """The native model class (an nn.Cell with transformers' module tree and parameter names)."""
    siglip_tower: bool = False
    """Vision tower layout: Qwen3-VL's (patch-embed bias, learned position grid, GELU MLP, DeepStack
    mergers, full attention everywhere) instead of Qwen2.5-VL's (windows, SwiGLU MLP)."""
    plain_vit: bool = False
    """Vision tower layout: Qwen2-VL's plain ViT (no patch-embed bias, LayerNorm blocks, `fc1`/`fc2`
    MLP, full attention per frame everywhere, a LayerNorm merger); False: as `siglip_tower` says."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k in the text attention."""
    attention_bias: bool | None = True
    """q/k/v biases in the text attention; None = config.json's `attention_bias`."""
    text_defaults: dict = field(default_factory=dict)
    """Text config values released checkpoints may leave out (rope_theta, mrope_section)."""
    vision_defaults: dict = field(default_factory=dict)
    """Vision config values released checkpoints may leave out (patch_size, hidden_act)."""
    text_mlp: Callable[[Any, int], Any] | None = None
    """(TextConfig, layer index) -> the cell for that decoder layer's `mlp`, or None for the dense SwiGLU
    MLP (an MoE family's sparse blocks). A cell with a `router_logits` attribute takes part in the
    router load-balancing loss (loss.py)."""
    linear_attention: Callable[[Any, Any], Any] | None = None
    """(TextConfig, Kernels) -> the token mixer (`linear_attn`) of each `linear_attention` layer of
    config.json's `layer_types` (a hybrid family's recurrent layer); None: attention in every layer."""
    attention_output_gate: bool = False
    """Gated attention: q_proj emits 2 * head_dim per head, the second half gating the output."""
    zero_centered_norm: bool = False
    """The text RMSNorms scale by 1 + weight (their checkpoints store the offset from one)."""
    read_config: Callable[[dict], Any] | None = None
    """config.json (a dict) -> the config `cls` takes, for a family whose config.json is not the Qwen VL
    layout VLConfig reads (Ovis2.5: a SigLIP2 tower config, indicator token ids)."""


def model_entry(model_type: str) -> MindSporeModel:
    """The MindSpore entry of a family; a clear error when the family has no native model."""
    spec = get_family(model_type)
    if not spec.capabilities.mindspore:
        raise ValueError(f"model_type {spec.name!r} has no MindSpore model; use backend: torch")
    return importlib.import_module(f"{__package__}.{spec.name}").ENTRY
