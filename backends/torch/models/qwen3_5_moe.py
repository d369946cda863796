"""Qwen3.5-MoE on torch: transformers' Qwen3_5MoeForConditionalGeneration, driven as Qwen3.5; the MoE
specifics are the family spec's and the router loss the engine adds for any model with experts."""

from .qwen3_5 import ENTRY  # noqa: F401

__all__ = ["ENTRY"]
