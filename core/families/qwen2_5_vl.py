"""Qwen2.5-VL: Qwen2-VL with a windowed SwiGLU vision tower (RMSNorm) and video ids in seconds."""

from __future__ import annotations

from dataclasses import replace

from .qwen2_vl import Qwen2VL
from .spec import Capabilities, MediaRule, ModelShape, PositionRule


class Qwen2_5VL(Qwen2VL):
    name = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"
    position = PositionRule(video_time="seconds")
    media = MediaRule(processor_class="Qwen2_5_VLProcessor")
    capabilities = Capabilities(mindspeed=True)
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

    def vision_sizes(self, vision: dict) -> tuple[int, int]:
        return vision["hidden_size"], vision["intermediate_size"]

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
