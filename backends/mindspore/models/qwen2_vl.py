"""Qwen2-VL on MindSpore: the shared Qwen VL cells with the plain ViT tower and Qwen2's q/k/v biases.

The language model is Qwen2.5-VL's (Qwen2 with chunked M-RoPE); only the vision tower differs.
"""

from .entry import MindSporeModel
from .qwen_vl import QwenVLForConditionalGeneration

ENTRY = MindSporeModel(
    cls=QwenVLForConditionalGeneration,
    plain_vit=True,
    attention_bias=True,
    text_defaults={"rope_theta": 1000000.0, "mrope_section": (16, 24, 24)},
    vision_defaults={"patch_size": 14, "hidden_act": "quick_gelu"},
)
