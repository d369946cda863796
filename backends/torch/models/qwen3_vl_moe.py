"""Qwen3-VL-MoE on torch: transformers' Qwen3VLMoeForConditionalGeneration, driven as Qwen3-VL (its tower
is Qwen3-VL's); the MoE specifics are the family spec's (module map, FLOPs) and the router loss the
engine adds for any model whose config has experts."""

from .qwen3_vl import ENTRY  # noqa: F401

__all__ = ["ENTRY"]
