"""Qwen2-VL on torch: transformers' Qwen2VLForConditionalGeneration, its tower's inputs precomputed."""

from .entry import TorchModel

ENTRY = TorchModel(vision_inputs=())
