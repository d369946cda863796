"""Qwen3.5 (dense) on MindSpore: Qwen3-VL's cells without DeepStack, and a hybrid language model.

The differences from Qwen3-VL, each a switch of the shared cells (models/entry.py) except the one
cell written here: the Gated DeltaNet (`linear_attn`) of the `linear_attention` layers of config.json's
`layer_types`, following transformers' `Qwen3_5GatedDeltaNet` with its parameter names and shapes
(`conv1d.weight` [C, 1, W] as nn.Conv1d stores it, `A_log`, `dt_bias`, `in_proj_qkv|z|b|a`, `norm`,
`out_proj`). Its sequence kernels are ops/mindspore/gated_delta.py: packed rows restart the conv window
and the recurrent state at every sample, as vltune's torch engine does (backends/torch/linear_attention.py).
The attention layers gate their output (q_proj emits twice head_dim per head), rotate a quarter of head_dim
with interleaved M-RoPE, and every text RMSNorm scales by 1 + w. Checkpoints' `mtp.*` tensors are not
part of the model: transformers skips them on load and vltune carries them through save
(`untrained_prefixes` of the family spec).
"""

from __future__ import annotations

from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from vltune.ops.mindspore.gated_delta import (
    Segments, causal_conv1d, causal_conv1d_varlen, chunk_gated_delta_rule, conv_window, gated_delta_rule_varlen,
)

from ..attention import Kernels, TextAttentionLayout
from .config import TextConfig
from .layers import Linear, RMSNormGated
from .qwen3_vl import ENTRY as QWEN3_VL
from .text import KVCache


def _param(array: np.ndarray, name: str) -> Parameter:
    return Parameter(Tensor(array.astype(np.float32)), name=name)


class Qwen3_5GatedDeltaNet(nn.Cell):
    """x [B, L, H] -> [B, L, H]: conv(in_proj_qkv x) split into q, k, v; the gated delta rule with
    beta = sigmoid(in_proj_b x) and log decay g = -exp(A_log) * softplus(in_proj_a x + dt_bias);
    the gated RMSNorm with gate in_proj_z x; out_proj."""

    def __init__(self, cfg: TextConfig, kernels: Kernels):
        super().__init__()
        self.num_v_heads, self.num_k_heads = cfg.linear_num_value_heads, cfg.linear_num_key_heads
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.head_k_dim * self.num_k_heads, self.head_v_dim * self.num_v_heads
        self.conv_width = cfg.linear_conv_kernel_dim
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Cell()
        self.conv1d.weight = _param(np.zeros((conv_dim, 1, self.conv_width)), "weight")
        self.dt_bias = _param(np.ones(self.num_v_heads), "dt_bias")
        self.A_log = _param(np.zeros(self.num_v_heads), "A_log")
        self.norm = RMSNormGated(self.head_v_dim, cfg.rms_norm_eps, kernels)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size, bias=False)
        self.in_proj_qkv = Linear(cfg.hidden_size, conv_dim, bias=False)
        self.in_proj_z = Linear(cfg.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = Linear(cfg.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = Linear(cfg.hidden_size, self.num_v_heads, bias=False)
        self.activation = cfg.hidden_act

    def construct(self, x: Tensor, layout: TextAttentionLayout, cache: KVCache | None = None, layer_index: int = 0) -> Tensor:
        b, length, _ = x.shape
        if layout.padding is not None:  # padding tokens enter the recurrence as zeros (transformers' mask)
            x = x * Tensor(layout.padding[:, -length:], x.dtype)[..., None]
        segments = Segments.from_cu_seqlens(layout.cu_seqlens) if layout.cu_seqlens is not None else None
        weight = self.conv1d.weight.reshape(self.conv1d.weight.shape[0], self.conv_width)  # [C, 1, W] -> [C, W]
        projected = self.in_proj_qkv(x)
        past = cache.states[layer_index] if cache is not None else None
        if past is not None:
            mixed = causal_conv1d(projected, weight, self.activation, window=past[0])
        else:
            mixed = causal_conv1d_varlen(projected, weight, self.activation, segments)
        query, key, value = ops.split(mixed, [self.key_dim, self.key_dim, self.value_dim], axis=-1)
        query = query.reshape(b, length, -1, self.head_k_dim)
        key = key.reshape(b, length, -1, self.head_k_dim)
        value = value.reshape(b, length, -1, self.head_v_dim)
        beta = ops.sigmoid(self.in_proj_b(x))
        # in fp32, as transformers: A could overflow to -inf in fp16
        g = -ops.exp(self.A_log.astype(ms.float32)) * ops.softplus(self.in_proj_a(x).astype(ms.float32) + self.dt_bias)
        if cache is not None:  # generation: continue from (and keep) the conv window and the recurrent state
            out, state = chunk_gated_delta_rule(query, key, value, g, beta, None if past is None else past[1])
            window = conv_window(projected, self.conv_width, None if past is None else past[0])
            cache.states[layer_index] = (window, state)
        else:
            out = gated_delta_rule_varlen(query, key, value, g, beta, segments)
        z = self.in_proj_z(x)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(b, length, self.value_dim))


ENTRY = replace(
    QWEN3_VL,
    linear_attention=Qwen3_5GatedDeltaNet,
    attention_output_gate=True,
    zero_centered_norm=True,
    text_defaults={"rope_theta": 10000000.0, "mrope_section": (11, 11, 10)},
)
