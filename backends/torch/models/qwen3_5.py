"""Qwen3.5 on torch: transformers' Qwen3_5ForConditionalGeneration. Its tower is Qwen3-VL's (position-grid
interpolation precomputed here); with no DeepStack its features are placed into the input embeddings
here. Packed rows reach the Gated DeltaNet layers through backends/torch/linear_attention.py."""

from .entry import TorchModel

ENTRY = TorchModel(vision_inputs=("interpolation",))
