"""Qwen2.5-VL: Qwen2-VL with a windowed SwiGLU vision tower (RMSNorm) and video ids in seconds."""

from __future__ import annotations

from dataclasses import replace

from .mindspeed import (
    COL, GATE_UP, GLU, QKV_TEXT, QKV_VISION, ROW, TEXT_FIRST, TEXT_LAST, TEXT_LAYER, VISION_FIRST, VISION_LAST,
    VISION_LAYER, TensorRule,
)
from .qwen2_vl import Qwen2VL
from .spec import Capabilities, FamilySpec, MediaRule, ModelShape, PositionRule


_VB, _VL = "visual.blocks.{n}.", "image_encoder.encoder.blocks.layers.{n}."
_TB, _TL = "model.layers.{n}.", "text_decoder.decoder.layers.{n}."

# In MindSpeed-MM's own key order: vision tower, projector, then the language model.
MINDSPEED_RULES: tuple[TensorRule, ...] = (
    TensorRule(("visual.patch_embed.proj.weight",), "image_encoder.encoder.patch_embed.proj.weight", VISION_FIRST),
    TensorRule((_VB + "norm1.weight",), _VL + "input_layernorm.weight", VISION_LAYER),
    TensorRule((_VB + "attn.qkv.weight",), _VL + "self_attention.linear_qkv.weight", VISION_LAYER, QKV_VISION, ROW),
    TensorRule((_VB + "attn.qkv.bias",), _VL + "self_attention.linear_qkv.bias", VISION_LAYER, QKV_VISION, ROW),
    TensorRule((_VB + "attn.proj.weight",), _VL + "self_attention.linear_proj.weight", VISION_LAYER, tp=COL),
    TensorRule((_VB + "attn.proj.bias",), _VL + "self_attention.linear_proj.bias", VISION_LAYER),
    TensorRule((_VB + "norm2.weight",), _VL + "pre_mlp_layernorm.weight", VISION_LAYER),
    TensorRule((_VB + "mlp.gate_proj.weight", _VB + "mlp.up_proj.weight"), _VL + "mlp.linear_fc1.weight",
               VISION_LAYER, GATE_UP, GLU),
    TensorRule((_VB + "mlp.gate_proj.bias", _VB + "mlp.up_proj.bias"), _VL + "mlp.linear_fc1.bias",
               VISION_LAYER, GATE_UP, GLU),
    TensorRule((_VB + "mlp.down_proj.weight",), _VL + "mlp.linear_fc2.weight", VISION_LAYER, tp=COL),
    TensorRule((_VB + "mlp.down_proj.bias",), _VL + "mlp.linear_fc2.bias", VISION_LAYER),
    TensorRule(("visual.merger.ln_q.weight",), "image_encoder.projector.layernorm.weight", VISION_LAST),
    TensorRule(("visual.merger.mlp.0.weight",), "image_encoder.projector.encoder.linear_fc1.weight", VISION_LAST, tp=ROW),
    TensorRule(("visual.merger.mlp.0.bias",), "image_encoder.projector.encoder.linear_fc1.bias", VISION_LAST, tp=ROW),
    TensorRule(("visual.merger.mlp.2.weight",), "image_encoder.projector.encoder.linear_fc2.weight", VISION_LAST, tp=COL),
    TensorRule(("visual.merger.mlp.2.bias",), "image_encoder.projector.encoder.linear_fc2.bias", VISION_LAST),
    TensorRule(("model.embed_tokens.weight",), "text_decoder.embedding.word_embeddings.weight", TEXT_FIRST, tp=ROW),
    TensorRule((_TB + "input_layernorm.weight",), _TL + "input_layernorm.weight", TEXT_LAYER),
    TensorRule(tuple(_TB + f"self_attn.{p}_proj.weight" for p in "qkv"), _TL + "self_attention.linear_qkv.weight",
               TEXT_LAYER, QKV_TEXT, ROW),
    TensorRule(tuple(_TB + f"self_attn.{p}_proj.bias" for p in "qkv"), _TL + "self_attention.linear_qkv.bias",
               TEXT_LAYER, QKV_TEXT, ROW),
    TensorRule((_TB + "self_attn.o_proj.weight",), _TL + "self_attention.linear_proj.weight", TEXT_LAYER, tp=COL),
    TensorRule((_TB + "post_attention_layernorm.weight",), _TL + "pre_mlp_layernorm.weight", TEXT_LAYER),
    TensorRule((_TB + "mlp.gate_proj.weight", _TB + "mlp.up_proj.weight"), _TL + "mlp.linear_fc1.weight",
               TEXT_LAYER, GATE_UP, GLU),
    TensorRule((_TB + "mlp.down_proj.weight",), _TL + "mlp.linear_fc2.weight", TEXT_LAYER, tp=COL),
    TensorRule(("model.norm.weight",), "text_decoder.decoder.final_layernorm.weight", TEXT_LAST),
    TensorRule(("lm_head.weight",), "text_decoder.output_layer.weight", TEXT_LAST, tp=ROW),
)
"""HF (released layout) -> MindSpeed-MM's Qwen2.5-VL checkpoint, as its own conversion scripts lay it out."""


class Qwen2_5VL(Qwen2VL):
    name = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"
    position = PositionRule(video_time="seconds")
    media = MediaRule(processor_class="Qwen2_5_VLProcessor")
    capabilities = Capabilities(mindspeed=True)
    mindspeed_rules = MINDSPEED_RULES
    vision_mlp_matrices = 3  # SwiGLU: gate, up, down
    shapes = {
        s.name: s
        for s in (
            ModelShape("qwen2_5_vl-3b", "qwen2_5_vl", 2048, 11008, 36, 16, 2, 151936, True, 1280, 3420, 32, 16,
                       fullatt_blocks=(7, 15, 23, 31)),
            ModelShape("qwen2_5_vl-7b", "qwen2_5_vl", 3584, 18944, 28, 28, 4, 152064, False, 1280, 3420, 32, 16,
                       fullatt_blocks=(7, 15, 23, 31)),
        )
    }

    vision_sizes = FamilySpec.vision_sizes  # hidden_size / intermediate_size again (Qwen2-VL alone differs)

    def vision_config(self, shape: ModelShape) -> dict:
        return {
            "model_type": f"{self.name}_vision",
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_heads": shape.vision_heads,
            "hidden_act": "silu",
            "patch_size": shape.patch_size,
            "temporal_patch_size": 2,
            "spatial_merge_size": shape.merge_size,
            "window_size": shape.window_size,
            "fullatt_block_indexes": list(shape.fullatt_blocks),
            "tokens_per_second": 2,
            "out_hidden_size": shape.hidden,
        }

    def tiny_shape(self, **sizes) -> ModelShape:
        shape = super().tiny_shape(**sizes)
        return replace(shape, fullatt_blocks=(shape.vision_depth - 1,))  # windowed blocks, then one full


SPEC = Qwen2_5VL()
