"""Qwen3-VL: a SigLIP-2 style tower (patch 16, learned position grid, GELU MLP) whose DeepStack mergers
feed early decoder layers, interleaved M-RoPE, QK-norm, and video time as timestamp text per frame."""

from __future__ import annotations

from dataclasses import replace

from .chat_templates import QWEN3_VL_CHAT_TEMPLATE
from .qwen2_vl import Qwen2VL
from .spec import Capabilities, FamilySpec, MediaRule, ModelShape, ModuleMap, PositionRule


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    architecture = "Qwen3VLForConditionalGeneration"
    chat_template = QWEN3_VL_CHAT_TEMPLATE
    position = PositionRule(video_time="per_frame", mrope_interleaved=True)
    media = MediaRule(video_processor="Qwen3VLVideoProcessor", video_placeholder="timestamped_frames",
                      processor_class="Qwen3VLProcessor")
    modules = ModuleMap(projectors=("model.visual.merger", "model.visual.deepstack_merger_list"))
    capabilities = Capabilities()  # everything but MindSpeed-MM conversion
    vision_mlp_matrices = 2  # linear_fc1, linear_fc2
    shapes = {
        s.name: s
        for s in (
            ModelShape("qwen3_vl-2b", "qwen3_vl", 2048, 6144, 28, 16, 8, 151936, True, 1024, 4096, 24, 16,
                       patch_size=16, deepstack=(5, 11, 17), head_dim=128),
            ModelShape("qwen3_vl-8b", "qwen3_vl", 4096, 12288, 36, 32, 8, 151936, False, 1152, 4304, 27, 16,
                       patch_size=16, deepstack=(8, 16, 24), head_dim=128),
        )
    }

    def mrope_section(self, head_dim: int) -> list[int]:
        """The released interleaved [24, 20, 20] split of head_dim 128, scaled."""
        half = head_dim // 2
        h = (half * 20) // 64
        return [half - 2 * h, h, h]

    def rope_parameters(self, shape: ModelShape) -> dict:
        return {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": self.mrope_section(shape.text_head_dim),
                "mrope_interleaved": True}

    def text_config(self, shape, ids) -> dict:
        config = super().text_config(shape, ids)
        config["head_dim"] = shape.text_head_dim
        return config

    vision_sizes = FamilySpec.vision_sizes  # hidden_size / intermediate_size again (Qwen2-VL alone differs)

    def vision_config(self, shape: ModelShape) -> dict:
        return {
            "model_type": self.name,
            "depth": shape.vision_depth,
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_heads": shape.vision_heads,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": shape.patch_size,
            "temporal_patch_size": 2,
            "spatial_merge_size": shape.merge_size,
            "out_hidden_size": shape.hidden,
            "num_position_embeddings": shape.num_position_embeddings,
            "deepstack_visual_indexes": list(shape.deepstack),
        }

    def processor_configs(self) -> dict[str, dict]:
        common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5]}
        image = {"size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 1280}, **common,
                 "image_processor_type": self.media.image_processor, "processor_class": self.media.processor_class}
        video = {  # as Qwen3-VL's released video_preprocessor_config.json (bounds on frames x height x width)
            "size": {"shortest_edge": 4096, "longest_edge": 25165824}, **common,
            "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True,
            "video_processor_type": self.media.video_processor, "processor_class": self.media.processor_class,
        }
        return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}

    def tiny_shape(self, **sizes) -> ModelShape:
        shape = super().tiny_shape(**sizes)
        # a learned 8x8 position grid (interpolated to any image size); DeepStack from the first block
        return replace(shape, patch_size=16, num_position_embeddings=64, deepstack=(0,),
                       head_dim=shape.hidden // shape.heads)


SPEC = Qwen3VL()
