"""Kernels, one per file beside an eager reference, selected from a table keyed by a config string.

ops/torch/ and ops/mindspore/ hold the engine-specific ones (varlen attention, fused cross-entropy,
rotary apply). The first arrive with the packing and speed issues; until then the backends use the
models' stock attention (sdpa or eager).
"""
