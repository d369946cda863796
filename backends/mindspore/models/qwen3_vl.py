"""Qwen3-VL on MindSpore: the shared Qwen VL cells with the SigLIP-2 style tower (DeepStack) and QK-norm."""

from .entry import MindSporeModel
from .qwen_vl import QwenVLForConditionalGeneration

ENTRY = MindSporeModel(
    cls=QwenVLForConditionalGeneration,
    siglip_tower=True,
    qk_norm=True,
    attention_bias=None,
    text_defaults={"rope_theta": 5000000.0, "mrope_section": (24, 20, 20)},
    vision_defaults={"patch_size": 16, "hidden_act": "gelu_pytorch_tanh"},
)
