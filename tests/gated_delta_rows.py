"""Random packed rows for the Gated DeltaNet kernel tests of both engines (tests/unit/backends/
test_gated_delta_packing.py for torch, tests/unit/ops/test_ms_gated_delta.py for MindSpore), and the
reference they are checked against: transformers' own torch delta rule."""

from __future__ import annotations

import torch


def reference():
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return modeling_qwen3_5.torch_chunk_gated_delta_rule


def random_row(lengths, heads=2, value_heads=4, dk=16, dv=8, seed=0) -> tuple[torch.Tensor, ...]:
    """q, k [1, T, heads, dk], v [1, T, value_heads, dv], decay (log-space, <= 0) and beta [1, T, value_heads]."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k = (torch.randn(1, total, heads, dk, generator=g) for _ in range(2))
    v = torch.randn(1, total, value_heads, dv, generator=g)
    decay = -torch.rand(1, total, value_heads, generator=g)
    beta = torch.rand(1, total, value_heads, generator=g)
    return q, k, v, decay, beta
