"""Qwen2.5-VL on MindSpore: the shared Qwen VL cells with a windowed SwiGLU tower and q/k/v biases."""

from .entry import MindSporeModel
from .qwen_vl import QwenVLForConditionalGeneration

ENTRY = MindSporeModel(
    cls=QwenVLForConditionalGeneration,
    attention_bias=True,
    text_defaults={"rope_theta": 1000000.0, "mrope_section": (16, 24, 24)},
    vision_defaults={"patch_size": 14, "hidden_act": "silu"},
)
