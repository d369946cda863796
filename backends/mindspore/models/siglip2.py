"""Ovis2.5's SigLIP2-NaViT vision tower in MindSpore (transformers' `Ovis2_5VisionModel`).

One feature per 16 x 16 patch, patches in the processor's 2 x 2 merge-block order:

* embeddings: a Conv2d whose stride equals its kernel (one matrix product per patch, the weight kept in
  the checkpoint's [E, C, P, P] shape) plus the learned (side x side) position grid resampled to each
  image's grid by bicubic interpolation (align_corners=False), as 16 gathered taps per patch;
* LayerNorm encoder layers with q/k/v/out projections, 2-D rotary (rows on the first quarter of the
  frequencies, columns on the second, as Qwen's towers) and a GELU MLP (fc1, fc2);
* each layer attends within its frame (`full_attention`) or within Qwen2.5-VL-style windows of
  merged tokens (`window_attention`); the tokens are put in window order before the first layer.

What leaves the tower is what transformers' `get_image_features` hands the projector: the last layer's
output (its `hidden_states[-1]`), still in window order, without `post_layernorm`. The post-norm's
parameters exist (checkpoints carry them) but no forward reaches them, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..attention import Kernels, vision_attention
from .layers import Embedding, LayerNorm, Linear, activation, apply_rotary, inv_freq, recomputes, rotary_cos_sin
from .vision_index import frame_cu_seqlens, patch_coordinates, window_index


LAYER_TYPES = ("full_attention", "window_attention")
"""Each layer attends within its frame, or within windows of merged tokens."""


@dataclass(frozen=True)
class Siglip2VisionConfig:
    """The `vision_config` of an Ovis2.5 config.json (transformers' Ovis2_5VisionConfig names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_channels: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    layer_types: tuple[str, ...]
    hidden_act: str
    layer_norm_eps: float
    rope_theta: float
    vocab_size: int
    """The visual vocabulary (indicator rows included), read by the visual tokenizer."""
    num_visual_indicator_tokens: int

    @classmethod
    def from_dict(cls, vision: dict) -> "Siglip2VisionConfig":
        layers = vision.get("num_hidden_layers", 27)
        layer_types = tuple(vision.get("layer_types") or ["full_attention"] * layers)
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown or len(layer_types) != layers:
            raise ValueError(f"vision_config.layer_types: expected {layers} of {LAYER_TYPES}, got {list(layer_types)}")
        return cls(
            hidden_size=vision.get("hidden_size", 1152),
            intermediate_size=vision.get("intermediate_size", 4304),
            num_hidden_layers=layers,
            num_attention_heads=vision.get("num_attention_heads", 16),
            patch_size=vision.get("patch_size", 16),
            image_size=vision.get("image_size", 512),
            num_channels=vision.get("num_channels", 3),
            temporal_patch_size=vision.get("temporal_patch_size", 1),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            window_size=vision.get("window_size", 112),
            layer_types=layer_types,
            hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
            rope_theta=float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            vocab_size=vision.get("vocab_size", 65536),
            num_visual_indicator_tokens=vision.get("num_visual_indicator_tokens", 4),
        )


def bicubic_position_taps(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample the learned (side x side) position grid to each image's grid, bicubic, align_corners=False.

    Returns (indices [n_patches, 16] into the flattened table, weights [n_patches, 16] fp32) in merge-block
    patch order: transformers' `get_vision_interpolation_indices_and_weights(mode="bicubic")` (the Keys
    kernel, a = -0.75, border taps clamped), with its fp32 arithmetic step by step.
    """
    grids = np.asarray(grid_thw).reshape(-1, 3)
    rows, cols = patch_coordinates(grids, merge).T
    heights = np.concatenate([np.full(int(t * h * w), h) for t, h, w in grids])
    widths = np.concatenate([np.full(int(t * h * w), w) for t, h, w in grids])

    def axis(index: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = (index.astype(np.float32) + np.float32(0.5)) * np.float32(side) / size.astype(np.float32) - np.float32(0.5)
        floor = np.floor(src)
        offsets = np.arange(-1, 3)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        d = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
        a = np.float32(-0.75)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return taps, np.where(d <= 1, near, far).astype(np.float32)

    h_taps, h_w = axis(rows, heights)
    w_taps, w_w = axis(cols, widths)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 16)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 16).astype(np.float32)
    return indices, weights


class Siglip2PatchEmbedding(nn.Cell):
    """`patch_embedding`: Conv2d(C, E, P, stride P) as [n, C*P*P] x [E, C*P*P]^T + bias."""

    def __init__(self, cfg: Siglip2VisionConfig):
        super().__init__()
        c, p = cfg.num_channels * cfg.temporal_patch_size, cfg.patch_size
        self.weight = Parameter(Tensor(np.zeros((cfg.hidden_size, c, p, p), np.float32)))
        self.bias = Parameter(Tensor(np.zeros(cfg.hidden_size, np.float32)))
        self.embed_dim, self.patch_dim = cfg.hidden_size, c * p * p
        self._matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixels: Tensor) -> Tensor:
        w = self.weight.reshape(self.embed_dim, self.patch_dim)
        return self._matmul(pixels.astype(w.dtype), w) + self.bias


class Ovis2_5VisionEmbeddings(nn.Cell):
    def __init__(self, cfg: Siglip2VisionConfig):
        super().__init__()
        self.patch_embedding = Siglip2PatchEmbedding(cfg)
        self.side = cfg.image_size // cfg.patch_size
        self.position_embedding = Embedding(self.side * self.side, cfg.hidden_size)
        self.merge = cfg.spatial_merge_size

    def construct(self, pixels: Tensor, grid_thw: np.ndarray) -> Tensor:
        """[n_patches, C*T*P*P] -> [n_patches, E], merge-block order."""
        idx, w = bicubic_position_taps(grid_thw, self.side, self.merge)
        taps = self.position_embedding(Tensor(idx.astype(np.int32)))  # [n, 16, E]
        pos = (taps * Tensor(w)[:, :, None].astype(taps.dtype)).sum(1)
        h = self.patch_embedding(pixels)
        return h + pos.astype(h.dtype)


class Ovis2_5VisionAttention(nn.Cell):
    def __init__(self, cfg: Siglip2VisionConfig, kernels: Kernels):
        super().__init__()
        e = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, e // cfg.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj = Linear(e, e), Linear(e, e), Linear(e, e)
        self.out_proj = Linear(e, e)
        self.kernels = kernels

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: np.ndarray) -> Tensor:
        n = x.shape[0]
        q = self.q_proj(x).reshape(n, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(n, self.heads, self.head_dim)
        v = self.v_proj(x).reshape(n, self.heads, self.head_dim)
        q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
        out = vision_attention(q, k, v, self.head_dim**-0.5, cu_seqlens, self.kernels)
        return self.out_proj(out.reshape(n, -1))


class Ovis2_5VisionMLP(nn.Cell):
    def __init__(self, cfg: Siglip2VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation_fn = activation(cfg.hidden_act)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class Ovis2_5VisionEncoderLayer(nn.Cell):
    def __init__(self, cfg: Siglip2VisionConfig, kernels: Kernels):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = Ovis2_5VisionAttention(cfg, kernels)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = Ovis2_5VisionMLP(cfg)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: np.ndarray) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.layer_norm2(x))


class Ovis2_5VisionModel(nn.Cell):
    """`model.vision_tower`: pixels [n_patches, C*T*P*P] + grids -> features [n_patches, E] in window order."""

    def __init__(self, cfg: Siglip2VisionConfig, kernels: Kernels):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Ovis2_5VisionEmbeddings(cfg)
        self.layers = nn.CellList([Ovis2_5VisionEncoderLayer(cfg, kernels) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.quarter = head_dim // 4
        base = inv_freq(cfg.rope_theta, head_dim // 2)  # [head_dim / 4], the same for rows and columns
        self.inv_freq = ops.cat((base, base))
        self.recompute_every = 0
        """gradient_checkpointing: the first and every recompute_every-th block recompute (0 = none; layers.recomputes)."""

    def construct(self, pixels: Tensor, grid_thw: np.ndarray) -> Tensor:
        """The embeddings are put in window order (whole 2 x 2 merge units, window by window) once, before
        the first layer, and stay in it: transformers' projector reads the last layer's output as it is."""
        grid_thw = np.asarray(grid_thw).reshape(-1, 3)
        cfg = self.cfg
        merge = cfg.spatial_merge_size
        order, cu_windows = window_index(grid_thw, merge, cfg.window_size, cfg.patch_size)
        unit = merge * merge
        patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
        coords = patch_coordinates(grid_thw, merge)[patch_order].astype(np.float32)
        # rows on the first quarter of the frequencies, columns on the second (transformers' recomposition)
        angles = np.concatenate([np.repeat(coords[:, :1], self.quarter, 1), np.repeat(coords[:, 1:], self.quarter, 1)], 1)
        cos, sin = rotary_cos_sin(Tensor(angles), self.inv_freq)
        segments = {"full_attention": frame_cu_seqlens(grid_thw), "window_attention": cu_windows}

        h = ops.gather(self.embeddings(pixels, grid_thw), Tensor(patch_order.astype(np.int32)), 0)
        for i, (kind, layer) in enumerate(zip(cfg.layer_types, self.layers)):
            if recomputes(self, i):
                h = ms.recompute(layer, h, cos, sin, segments[kind])
            else:
                h = layer(h, cos, sin, segments[kind])
        return h
