"""config.json -> the sizes the MindSpore models need, read without transformers.

Both config.json spellings are read: the nested one transformers 5 writes (`text_config`,
`rope_parameters`) and the flat one of the released Qwen2.5-VL checkpoints (text keys at the top,
`rope_theta` + `rope_scaling.mrope_section`). Defaults are transformers' own for missing keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vltune.core.families import family_names, get_family, read_config

from .entry import model_entry

SUPPORTED_MODEL_TYPES = family_names("mindspore")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    mrope_interleaved: bool
    attention_bias: bool
    """Qwen2.5-VL has q/k/v biases; Qwen3-VL has none (and per-head q/k RMSNorms instead)."""
    qk_norm: bool
    hidden_act: str = "silu"
    # MoE (0 experts: every MLP dense). Which layers are sparse is transformers' rule: not in
    # mlp_only_layers and (layer + 1) % decoder_sparse_step == 0.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    shared_expert_intermediate_size: int = 0
    """Qwen3.5-MoE: a dense expert every token goes through, scaled by a sigmoid gate (0: none)."""
    # Hybrid models (Qwen3.5): each layer's token mixer (config.json's `layer_types`; empty = attention
    # everywhere), the Gated DeltaNet's sizes, and the attention's differences.
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    partial_rotary_factor: float = 1.0
    """The share of head_dim that M-RoPE rotates (the rest passes through)."""
    attention_output_gate: bool = False
    """q_proj also emits a per-channel gate: attention output * sigmoid(gate) before o_proj."""
    zero_centered_norm: bool = False
    """RMSNorm weights stored as w with the scale 1 + w (the decoder's norms and q/k norms)."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    hidden_act: str
    rope_theta: float = 10000.0
    # Qwen2.5-VL
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen3-VL
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class VLConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    tie_word_embeddings: bool
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "VLConfig":
        return cls.from_dict(read_config(model_dir))

    @classmethod
    def from_dict(cls, cfg: dict) -> "VLConfig":
        model_type = cfg.get("model_type")
        spec = get_family(model_type, "config.json model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} has no MindSpore model (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        entry = model_entry(model_type)
        if entry.read_config is not None:  # a family with its own config.json layout (models/entry.py)
            return entry.read_config(cfg)
        text = cfg.get("text_config") or cfg  # released Qwen2.5-VL configs are flat
        vision = cfg["vision_config"]
        rope = text.get("rope_parameters") or {}
        scaling = text.get("rope_scaling") or {}
        heads = text["num_attention_heads"]
        text_cfg = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text.get("intermediate_size", 0),  # an all-MoE config (Qwen3.5-MoE) has none
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads", heads),
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", entry.text_defaults["rope_theta"]))),
            mrope_section=tuple(rope.get("mrope_section") or scaling.get("mrope_section") or entry.text_defaults["mrope_section"]),
            mrope_interleaved=bool(rope.get("mrope_interleaved", scaling.get("mrope_interleaved", spec.position.mrope_interleaved))),
            attention_bias=bool(text.get("attention_bias", False)) if entry.attention_bias is None else entry.attention_bias,
            qk_norm=entry.qk_norm,
            hidden_act=text.get("hidden_act", "silu"),
            num_experts=int(text.get("num_experts", text.get("num_local_experts", 0)) or 0),  # transformers 5 writes the latter
            num_experts_per_tok=int(text.get("num_experts_per_tok", 0) or 0),
            moe_intermediate_size=int(text.get("moe_intermediate_size", 0) or 0),
            decoder_sparse_step=int(text.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(text.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(text.get("router_aux_loss_coef", 0.0) or 0.0),
            shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size", 0) or 0),
            layer_types=tuple(text.get("layer_types") or ()),
            linear_num_key_heads=int(text.get("linear_num_key_heads", 0) or 0),
            linear_num_value_heads=int(text.get("linear_num_value_heads", 0) or 0),
            linear_key_head_dim=int(text.get("linear_key_head_dim", 0) or 0),
            linear_value_head_dim=int(text.get("linear_value_head_dim", 0) or 0),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 0) or 0),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))),
            attention_output_gate=entry.attention_output_gate,
            zero_centered_norm=entry.zero_centered_norm,
        )
        vrope = vision.get("rope_parameters") or {}
        vision_hidden, vision_intermediate = spec.vision_sizes(vision)  # Qwen2-VL: embed_dim, embed_dim * mlp_ratio
        vision_cfg = VisionConfig(
            depth=vision["depth"],
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            num_heads=vision["num_heads"],
            # Qwen2-VL has no out_hidden_size: its vision `hidden_size` is the merger's output width.
            out_hidden_size=vision.get("out_hidden_size", vision["hidden_size"]),
            patch_size=vision.get("patch_size", entry.vision_defaults["patch_size"]),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
            hidden_act=vision.get("hidden_act", entry.vision_defaults["hidden_act"]),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            window_size=vision.get("window_size", 112),
            fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", ())),
            num_position_embeddings=vision.get("num_position_embeddings", 0),
            deepstack_visual_indexes=tuple(vision.get("deepstack_visual_indexes", ())),
        )
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(model_type, text_cfg, vision_cfg, cfg["image_token_id"], cfg["video_token_id"], bool(tie), raw=cfg)
