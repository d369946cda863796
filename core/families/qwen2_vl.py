"""Qwen2-VL: the base of the Qwen VL line.

A plain ViT (LayerNorm, quick-GELU MLP, no windows) with a 2x2 patch merger, Qwen2's text model with
chunked 3D M-RoPE, and video positions that count frame groups.
"""

from __future__ import annotations

from .spec import Capabilities, FamilySpec, MediaRule, ModelShape, PositionRule, TokenIds

# OpenAI CLIP statistics: the Qwen2/2.5-VL processors normalise with them.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class Qwen2VL(FamilySpec):
    name = "qwen2_vl"
    architecture = "Qwen2VLForConditionalGeneration"
    position = PositionRule(video_time="frame_index")
    media = MediaRule(processor_class="Qwen2VLProcessor")
    capabilities = Capabilities()  # everything but MindSpeed-MM conversion
    vision_mlp_matrices = 2  # fc1, fc2
    # <|endoftext|> 151643, <|im_end|> 151645, <|vision_start|> 151652 ... <|video_pad|> 151656 (Qwen2 tokenizer)
    released_token_ids = TokenIds(image=151655, video=151656, vision_start=151652, vision_end=151653, bos=151643,
                                  eos=151645, pad=151643)

    def vision_sizes(self, vision: dict) -> tuple[int, int]:
        hidden = vision["embed_dim"]
        return hidden, int(hidden * vision.get("mlp_ratio", 4))

    def vision_config(self, shape: ModelShape) -> dict:
        return {
            "model_type": self.name,
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_hidden,
            "hidden_size": shape.hidden,  # the merger's output width
            "mlp_ratio": max(1, shape.vision_intermediate // shape.vision_hidden),  # an int in Qwen2-VL configs
            "num_heads": shape.vision_heads,
            "hidden_act": "quick_gelu",
            "patch_size": shape.patch_size,
            "temporal_patch_size": 2,
            "spatial_merge_size": shape.merge_size,
        }

    def processor_configs(self) -> dict[str, dict]:
        image = {
            "min_pixels": 56 * 56,
            "max_pixels": 28 * 28 * 1280,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "image_processor_type": self.media.image_processor,
            "processor_class": self.media.processor_class,
        }
        return {"preprocessor_config.json": image}


SPEC = Qwen2VL()
