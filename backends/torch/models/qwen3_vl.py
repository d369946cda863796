"""Qwen3-VL on torch: transformers' Qwen3VLForConditionalGeneration; the tower's position-grid
interpolation is precomputed, and its DeepStack features go to the stock forward."""

from .entry import TorchModel

ENTRY = TorchModel(vision_inputs=("interpolation",), features_to_forward=True)
