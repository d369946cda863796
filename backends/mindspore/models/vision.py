"""The Qwen VL vision towers in MindSpore: patch embedding, 2D rotary, attention blocks, mergers.

Qwen2.5-VL (`Qwen2_5_VisionTransformer`): RMSNorm blocks with a gated MLP; most blocks attend within
windows of `window_size` pixels (tokens reordered window by window), the `fullatt_block_indexes`
blocks within whole frames; the merger (RMSNorm, 2x2 patches -> MLP) output is put back in order.
Qwen3-VL (`Qwen3VisionTransformer`): LayerNorm blocks with a plain MLP, a learned position grid
resampled bilinearly to each image, full attention per frame, and DeepStack mergers that tap the
hidden states after the `deepstack_visual_indexes` blocks.
Qwen2-VL (`Qwen2VisionTransformerPretrainedModel`, `plain=True`): LayerNorm blocks with a plain MLP
(`fc1`, `fc2`), full attention per frame in every block, no position grid, and Qwen2.5-VL's merger
with a LayerNorm in place of the RMSNorm.

The patch embedding is a Conv3d whose stride equals its kernel, i.e. one matrix product per patch;
it is written as that product (the weight keeps the Conv3d shape [E, C, T, P, P] of the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..attention import Kernels, vision_attention
from .config import VisionConfig
from .layers import GatedMLP, LayerNorm, Linear, RMSNorm, activation, apply_rotary, inv_freq, recomputes, rotary_cos_sin
from .vision_index import bilinear_position_taps, frame_cu_seqlens, patch_coordinates, window_index


class PatchEmbed(nn.Cell):
    def __init__(self, cfg: VisionConfig, bias: bool):
        super().__init__()
        c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
        self.proj = nn.Cell()
        self.proj.weight = Parameter(Tensor(np.zeros((cfg.hidden_size, c, t, p, p), np.float32)), name="weight")
        self.proj.bias = Parameter(Tensor(np.zeros(cfg.hidden_size, np.float32)), name="bias") if bias else None
        self.embed_dim, self.patch_dim = cfg.hidden_size, c * t * p * p
        self._matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixels: Tensor) -> Tensor:
        """[n_patches, C*T*P*P] -> [n_patches, hidden]."""
        w = self.proj.weight.reshape(self.embed_dim, self.patch_dim)
        out = self._matmul(pixels.astype(w.dtype), w)
        return out + self.proj.bias if self.proj.bias is not None else out


class VisionAttention(nn.Cell):
    def __init__(self, cfg: VisionConfig, kernels: Kernels):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, True)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, True)
        self.kernels = kernels

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: np.ndarray) -> Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, D]
        q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
        out = vision_attention(q, k, v, self.head_dim**-0.5, cu_seqlens, self.kernels)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Cell):
    """Qwen3-VL's block MLP: fc2(act(fc1(x)))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, True)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, True)
        self.act_fn = activation(cfg.hidden_act)

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class Qwen2VLVisionMLP(nn.Cell):
    """Qwen2-VL's block MLP: the same as Qwen3-VL's under transformers' names (`fc1`, `act`, `fc2`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, True)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, True)
        self.act = activation(cfg.hidden_act)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Cell):
    def __init__(self, cfg: VisionConfig, kernels: Kernels, qwen3: bool, plain: bool = False):
        super().__init__()
        if plain:
            self.norm1, self.norm2 = LayerNorm(cfg.hidden_size, 1e-6), LayerNorm(cfg.hidden_size, 1e-6)
            self.mlp = Qwen2VLVisionMLP(cfg)
        elif qwen3:
            self.norm1, self.norm2 = LayerNorm(cfg.hidden_size, 1e-6), LayerNorm(cfg.hidden_size, 1e-6)
            self.mlp = VisionMLP(cfg)
        else:
            self.norm1, self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, kernels), RMSNorm(cfg.hidden_size, 1e-6, kernels)
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)
        self.attn = VisionAttention(cfg, kernels)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: np.ndarray) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VLPatchMerger(nn.Cell):
    """RMSNorm per patch (LayerNorm in Qwen2-VL: `layer_norm`), 2x2 patches concatenated,
    Linear-GELU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, cfg: VisionConfig, kernels: Kernels, layer_norm: bool = False):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = LayerNorm(cfg.hidden_size, 1e-6) if layer_norm else RMSNorm(cfg.hidden_size, 1e-6, kernels)
        self.mlp = nn.CellList([Linear(self.hidden, self.hidden, True), nn.Cell(), Linear(self.hidden, cfg.out_hidden_size, True)])

    def construct(self, x: Tensor) -> Tensor:
        h = self.ln_q(x).reshape(-1, self.hidden)
        return self.mlp[2](ops.gelu(self.mlp[0](h), approximate="none"))


class Qwen3VLPatchMerger(nn.Cell):
    """LayerNorm (before the 2x2 concatenation, or after it for DeepStack), Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.hidden if postshuffle_norm else cfg.hidden_size, 1e-6)
        self.linear_fc1 = Linear(self.hidden, self.hidden, True)
        self.linear_fc2 = Linear(self.hidden, cfg.out_hidden_size, True)

    def construct(self, x: Tensor) -> Tensor:
        h = self.norm(x.reshape(-1, self.hidden)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.hidden)
        return self.linear_fc2(ops.gelu(self.linear_fc1(h), approximate="none"))


@dataclass
class VisionOutput:
    """Merged tokens [n_tokens, out_hidden] in the processor's order, plus DeepStack taps (Qwen3-VL)."""

    embeds: Tensor
    deepstack: list[Tensor]


def _rotary_angles_positions(grid_thw: np.ndarray, merge: int, quarter: int) -> np.ndarray:
    """[n_patches, head_dim / 2]: row index for the first `quarter` frequencies, column for the next."""
    coords = patch_coordinates(grid_thw, merge).astype(np.float32)
    return np.concatenate([np.repeat(coords[:, :1], quarter, 1), np.repeat(coords[:, 1:], quarter, 1)], axis=1)


class VisionTransformer(nn.Cell):
    """`model.visual` for Qwen2.5-VL (`qwen3=False`), Qwen3-VL (`qwen3=True`) and Qwen2-VL (`plain=True`)."""

    def __init__(self, cfg: VisionConfig, kernels: Kernels, qwen3: bool, plain: bool = False):
        super().__init__()
        self.cfg, self.qwen3, self.plain = cfg, qwen3, plain
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg, bias=qwen3)
        head_dim = cfg.hidden_size // cfg.num_heads
        self.quarter = head_dim // 4
        base = inv_freq(cfg.rope_theta, head_dim // 2)  # [head_dim / 4]
        self.inv_freq = ops.cat((base, base))  # h frequencies, then the same for w
        self.blocks = nn.CellList([VisionBlock(cfg, kernels, qwen3, plain) for _ in range(cfg.depth)])
        if qwen3:
            self.pos_embed = nn.Cell()
            self.pos_embed.weight = Parameter(Tensor(np.zeros((cfg.num_position_embeddings, cfg.hidden_size), np.float32)), name="weight")
            self.side = int(cfg.num_position_embeddings**0.5)
            self.merger = Qwen3VLPatchMerger(cfg, postshuffle_norm=False)
            self.deepstack_merger_list = nn.CellList(
                [Qwen3VLPatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes]
            )
        else:
            self.merger = Qwen2_5_VLPatchMerger(cfg, kernels, layer_norm=plain)
        self.recompute_every = 0
        """gradient_checkpointing: the first and every recompute_every-th block recompute (0 = none; layers.recomputes)."""

    def construct(self, pixels: Tensor, grid_thw: np.ndarray) -> VisionOutput:
        grid_thw = np.asarray(grid_thw).reshape(-1, 3)
        cu_frames = frame_cu_seqlens(grid_thw)
        angles = _rotary_angles_positions(grid_thw, self.merge, self.quarter)
        h = self.patch_embed(pixels)
        if self.qwen3:
            idx, w = bilinear_position_taps(grid_thw, self.side, self.merge)
            taps = ops.gather(self.pos_embed.weight, Tensor(idx.reshape(-1).astype(np.int32)), 0).reshape(idx.shape[0], 4, -1)
            h = h + (taps * Tensor(w)[:, :, None]).sum(1).astype(h.dtype)
        order = None
        if not (self.qwen3 or self.plain):
            # Window attention: reorder whole 2x2 merge units window by window (and back after the merger).
            order, cu_windows = window_index(grid_thw, self.merge, self.cfg.window_size, self.cfg.patch_size)
            unit = self.merge**2
            patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
            h = ops.gather(h, Tensor(patch_order.astype(np.int32)), 0)
            angles = angles[patch_order]
        cos, sin = rotary_cos_sin(Tensor(angles), self.inv_freq)

        deepstack = []
        for i, block in enumerate(self.blocks):
            full = self.qwen3 or self.plain or i in self.cfg.fullatt_block_indexes
            cu = cu_frames if full else cu_windows
            if recomputes(self, i):
                h = ms_recompute(block, h, cos, sin, cu)
            else:
                h = block(h, cos, sin, cu)
            if self.qwen3 and i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](h))
        merged = self.merger(h)
        if order is not None:
            merged = ops.gather(merged, Tensor(np.argsort(order).astype(np.int32)), 0)
        return VisionOutput(merged, deepstack)


def ms_recompute(cell: nn.Cell, *args):
    """Run `cell` under activation recomputation (its activations are rebuilt in the backward pass)."""
    import mindspore as ms

    return ms.recompute(cell, *args)
