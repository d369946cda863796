"""Qwen2.5-VL on torch: transformers' Qwen2_5_VLForConditionalGeneration; the tower's window order is
precomputed with its rotary ids."""

from .entry import TorchModel

ENTRY = TorchModel(vision_inputs=("windows",))
