"""Qwen3.5-MoE (and Qwen3.6) on MindSpore: Qwen3.5 with a sparse MoE block as every layer's MLP.

The block is Qwen3-VL-MoE's router and top-k dispatch (models/qwen3_vl_moe.py) plus a shared expert
every token goes through, scaled by sigmoid(`shared_expert_gate` x), as transformers'
`Qwen3_5MoeSparseMoeBlock`. The routed experts are kept one MLP each (`mlp.experts.{e}.gate_proj.weight`,
`up_proj`, `down_proj`), which is how Qwen3.5-MoE checkpoints store them (transformers fuses them on load
and splits them again on save), so the files load and save back unchanged. Their projections are
plain weight cells, not `Linear`: LoRA's module targets (`gate_proj`, ...) reach the shared expert only,
as on the torch engine, where the routed experts are fused parameters.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import TextConfig
from .layers import GatedMLP, Linear, activation
from .qwen3_5 import ENTRY as QWEN3_5
from .qwen3_vl_moe import Qwen3VLMoeSparseMoeBlock


class Qwen3_5MoeExpertWeight(nn.Cell):
    """One [out, in] projection of a routed expert: x W^T."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((out_features, in_features), np.float32)))

    def construct(self, x: Tensor) -> Tensor:
        return ops.matmul(x, self.weight.astype(x.dtype).T)


class Qwen3_5MoeExpert(nn.Cell):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = Qwen3_5MoeExpertWeight(hidden, intermediate)
        self.up_proj = Qwen3_5MoeExpertWeight(hidden, intermediate)
        self.down_proj = Qwen3_5MoeExpertWeight(intermediate, hidden)
        self.act_fn = activation(act)

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen3_5MoeExperts(nn.CellList):
    """`mlp.experts.{e}`: the routed experts, one MLP each."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, act: str):
        super().__init__([Qwen3_5MoeExpert(hidden, intermediate, act) for _ in range(num_experts)])

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x [n, H] -> [n, H]."""
        return self[e](x)


class Qwen3_5MoeSparseMoeBlock(Qwen3VLMoeSparseMoeBlock):
    """x [B, L, H] -> the routed experts' weighted sum + sigmoid(shared_expert_gate x) * shared_expert(x)."""

    experts_cls = Qwen3_5MoeExperts

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act, bias=False)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def construct(self, x: Tensor) -> Tensor:
        routed = super().construct(x)
        return routed + ops.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def moe_mlp(cfg: TextConfig, layer: int) -> nn.Cell:
    """Every layer's MLP is sparse (transformers' `Qwen3_5MoeDecoderLayer` has no dense ones)."""
    return Qwen3_5MoeSparseMoeBlock(cfg)


ENTRY = replace(QWEN3_5, text_mlp=moe_mlp)  # Qwen3.5's cells, the MLPs sparse with a shared expert
