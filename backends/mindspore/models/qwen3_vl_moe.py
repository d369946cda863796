"""Qwen3-VL-MoE on MindSpore: the Qwen3-VL cells, each decoder layer's MLP a sparse MoE block.

The block follows transformers' `Qwen3VLMoeTextSparseMoeBlock` and keeps its parameter names and
layouts, so HF checkpoints load unchanged: `mlp.gate.weight` [E, H] (the router),
`mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I] (fused experts, each slice
an nn.Linear-style [out, in] matrix). A token goes to its top-k experts by softmax probability, their
weights renormalised to sum to one. The router's logits of the last forward stay on the block
(`router_logits`) for the load-balancing loss (backends/mindspore/loss.py).
"""

from __future__ import annotations

from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .config import TextConfig
from .layers import activation
from .qwen3_vl import ENTRY as QWEN3_VL


def _zeros(*shape: int) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, dtype=np.float32)))


class Qwen3VLMoeRouter(nn.Cell):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = _zeros(num_experts, hidden)


class Qwen3VLMoeExperts(nn.Cell):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, act: str):
        super().__init__()
        self.gate_up_proj = _zeros(num_experts, 2 * intermediate, hidden)
        self.down_proj = _zeros(num_experts, hidden, intermediate)
        self.intermediate, self.act_fn = intermediate, activation(act)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x [n, H] -> [n, H]."""
        gate_up = ops.matmul(x, self.gate_up_proj[e].astype(x.dtype).T)
        gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
        return ops.matmul(self.act_fn(gate) * up, self.down_proj[e].astype(x.dtype).T)


class Qwen3VLMoeSparseMoeBlock(nn.Cell):
    """x [B, L, H] -> sum over the top-k experts of weight * expert(x)."""

    experts_cls = Qwen3VLMoeExperts
    """(hidden, intermediate, num_experts, act) -> the cell whose `expert(e, x)` runs expert e; a family
    whose checkpoints store the experts otherwise (Qwen3.5-MoE: one MLP each) names its own."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.gate = Qwen3VLMoeRouter(cfg.hidden_size, cfg.num_experts)
        self.experts = self.experts_cls(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.hidden_act)
        self.router_logits: Tensor | None = None

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = ops.matmul(flat, self.gate.weight.astype(flat.dtype).T)  # [N, E]
        self.router_logits = logits
        probs = ops.softmax(logits.astype(ms.float32), axis=-1)
        top, chosen = ops.topk(probs, self.top_k)
        top = (top / top.sum(-1, keepdims=True)).astype(flat.dtype)
        out = ops.zeros_like(flat)
        hits = chosen.asnumpy()  # PyNative: which experts got tokens decides which run (as transformers' eager loop)
        for e in np.unique(hits):
            rows, slots = np.nonzero(hits == e)  # the tokens routed to e, and in which of their k slots
            weight = ops.gather_nd(top, Tensor(np.stack([rows, slots], axis=1).astype(np.int32)))[:, None]
            index = Tensor(rows.astype(np.int32))
            y = self.experts.expert(int(e), ops.gather(flat, index, 0)) * weight
            out = ops.tensor_scatter_add(out, index[:, None], y)
        return out.reshape(shape)


def moe_mlp(cfg: TextConfig, layer: int) -> nn.Cell | None:
    """The sparse block for layers transformers makes sparse; None keeps the dense MLP."""
    sparse = cfg.num_experts > 0 and layer not in cfg.mlp_only_layers and (layer + 1) % cfg.decoder_sparse_step == 0
    return Qwen3VLMoeSparseMoeBlock(cfg) if sparse else None


ENTRY = replace(QWEN3_VL, text_mlp=moe_mlp)  # Qwen3-VL's cells, the MLPs sparse
