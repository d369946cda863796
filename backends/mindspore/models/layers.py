"""Building blocks shared by the MindSpore Qwen VL models.

Every parameter is named and shaped as in the transformers model (`weight` [out, in], `bias`), so a
model's `parameters_and_names()` *is* the HF state-dict layout and checkpoint.py needs no per-layer
renames. Weights are created as zeros: they are always loaded from an HF directory afterwards.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..attention import Kernels, rms_norm


def _zeros(*shape: int) -> Parameter:
    return Parameter(Tensor(np.zeros(shape, dtype=np.float32)))


class Linear(nn.Cell):
    """y = x W^T + b with W [out, in], as torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _zeros(out_features, in_features)
        self.bias = _zeros(out_features) if bias else None
        self._matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]), self.weight.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Embedding(nn.Cell):
    """Row lookup in `weight` [vocab, hidden] (named like torch.nn.Embedding, not nn.Embedding's table)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = _zeros(num_embeddings, dim)

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)


class RMSNorm(nn.Cell):
    """`zero_centered` (Qwen3.5): the checkpoint stores w and the scale is 1 + w, applied in fp32 before the
    cast back, as transformers' `Qwen3_5RMSNorm` does."""

    def __init__(self, dim: int, eps: float, kernels: Kernels, zero_centered: bool = False):
        super().__init__()
        self.weight = Parameter(Tensor(np.full(dim, 0.0 if zero_centered else 1.0, dtype=np.float32)))
        self.eps, self.kernels, self.zero_centered = eps, kernels, zero_centered

    def construct(self, x: Tensor) -> Tensor:
        if not self.zero_centered:
            return rms_norm(x, self.weight, self.eps, self.kernels)
        scale = 1.0 + self.weight.astype(ms.float32)
        return rms_norm(x.astype(ms.float32), scale, self.eps, self.kernels).astype(x.dtype)


class RMSNormGated(nn.Cell):
    """RMSNorm, then times silu(gate) (the Gated DeltaNet's output norm): the normalised x is cast back to
    x's dtype before the weight, the gate applied in fp32, as transformers' `Qwen3_5RMSNormGated`."""

    def __init__(self, dim: int, eps: float, kernels: Kernels):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(dim, dtype=np.float32)))
        self.eps, self.kernels = eps, kernels

    def construct(self, x: Tensor, gate: Tensor) -> Tensor:
        h = rms_norm(x, self.weight, self.eps, self.kernels)
        return (h.astype(ms.float32) * ops.silu(gate.astype(ms.float32))).astype(x.dtype)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm (weight, bias, biased variance) over the last axis."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(dim, dtype=np.float32)))
        self.bias = _zeros(dim)
        self.eps = eps

    def construct(self, x: Tensor) -> Tensor:
        mean = ops.mean(x, -1, keep_dims=True)
        centred = x - mean
        var = ops.mean(centred * centred, -1, keep_dims=True)
        return centred * ops.rsqrt(var + self.eps) * self.weight + self.bias


def activation(name: str):
    """transformers' ACT2FN for the names Qwen VL configs use."""
    table = {
        "silu": ops.silu,
        "gelu": lambda x: ops.gelu(x, approximate="none"),
        "gelu_pytorch_tanh": lambda x: ops.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * ops.sigmoid(1.702 * x),  # Qwen2-VL's tower (transformers' QuickGELUActivation)
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported by the MindSpore models (have {sorted(table)})")
    return table[name]


class GatedMLP(nn.Cell):
    """down(act(gate(x)) * up(x)): the LLM's SwiGLU and Qwen2.5-VL's vision MLP (with biases)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias)
        self.up_proj = Linear(hidden, intermediate, bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act_fn = activation(act)

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def recomputes(stack: nn.Cell, i: int) -> bool:
    """gradient_checkpointing: whether block `i` of a stack (decoder layers, vision blocks) is recomputed in
    the backward pass: the first and every `stack.recompute_every`-th (set by the engine; 0 = none)."""
    return bool(stack.recompute_every) and stack.training and i % stack.recompute_every == 0


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), axis=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, in fp32 (cos/sin broadcast against x)."""
    dtype = x.dtype
    x = x.astype(ms.float32)
    return (x * cos + rotate_half(x) * sin).astype(dtype)


def rotary_cos_sin(angles_positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """positions [..., D/2] (already one channel per frequency) * inv_freq [D/2] -> cos, sin [..., D].

    The product is taken in fp32 element by element, exactly as transformers multiplies its
    position ids by inv_freq, so the angles are bit-identical.
    """
    freqs = angles_positions.astype(ms.float32) * inv_freq
    emb = ops.cat((freqs, freqs), axis=-1)
    return ops.cos(emb), ops.sin(emb)


def inv_freq(base: float, dim: int) -> Tensor:
    """1 / base^(arange(0, dim, 2) / dim) in fp32 as transformers computes it: fp32 exponents, the power
    rounded to fp32, an fp32 reciprocal (numpy's own fp32 pow differs from torch's in the last bit)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)
    return Tensor(np.float32(1.0) / power)
