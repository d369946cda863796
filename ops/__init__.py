"""Kernels, one per file beside an eager reference, selected from a table keyed by a config string.

ops/torch/attention.py: varlen attention for packed rows (torch's own varlen / FlexAttention / SDPA per
sub-sequence, flash-attn and FA4 when installed). ops/mindspore/attention.py: flash attention on Ascend,
an eager reference elsewhere. Fused cross-entropy and rotary kernels are not here: the torch backend
uses Liger's or torch.compile's (backends/torch/speed.py), the MindSpore models their own ops.
"""
