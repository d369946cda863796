"""The Qwen VL language model in MindSpore: GQA attention with M-RoPE, SwiGLU MLP, RMSNorm.

One decoder serves every family; the differences are switches read from config.json:
Qwen2.5-VL has q/k/v biases and chunked M-RoPE ([16, 24, 24] frequencies for t, h, w); Qwen3-VL
has per-head q/k RMSNorms, interleaved M-RoPE and DeepStack (vision features added to the hidden
states of the first layers). Qwen3.5 is hybrid: `layer_types` gives some layers a recurrent token
mixer (`linear_attn`, the family's cell) instead of `self_attn`; its attention gates its output with a
second half of q_proj, rotates only `partial_rotary_factor` of head_dim, and its RMSNorms scale by 1 + w.

Positions arrive from the batch (core/rope2d computed them), never recomputed here. Circle-RoPE's
AGE strategies give some layers the plain M-RoPE ids (`position_ids_alt`): each layer is told which
cos/sin to use by `age_layer_mask`, as backends/torch/models/circle_rope.py does with hooks.

Generation passes a `KVCache`: each attention layer appends the new tokens' rotated keys and values
to its cached ones and attends over all of them, so a decoding step runs one token per row.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from vltune.core.circle_rope import age_layer_mask
from vltune.core.families import attention_layer_indices

from ..attention import Kernels, TextAttentionLayout, text_attention
from .config import TextConfig
from .layers import Embedding, GatedMLP, Linear, RMSNorm, apply_rotary, inv_freq, recomputes, rotary_cos_sin


def mrope_channels(section: tuple[int, ...], interleaved: bool) -> np.ndarray:
    """[head_dim / 2] which position row (0 = t, 1 = h, 2 = w) each rotary frequency reads.

    Chunked (Qwen2/2.5-VL): the first section[0] frequencies t, the next section[1] h, then w.
    Interleaved (Qwen3-VL): t h w t h w ... for 3 * section[1] (h) and 3 * section[2] (w)
    frequencies, the rest t.
    """
    half = int(sum(section))
    if not interleaved:
        return np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)]).astype(np.int64)
    channels = np.zeros(half, dtype=np.int64)
    for dim in (1, 2):
        channels[dim : section[dim] * 3 : 3] = dim
    return channels


def rotary_positions(position_ids: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """[3, B, L] ids -> [B, L, head_dim / 2] fp32: each frequency's position, picked from its row.

    Picking rows before the multiplication by inv_freq gives the very products transformers forms
    after it (it multiplies all three rows, then selects), so the angles are identical.
    """
    pos = np.asarray(position_ids).astype(np.float32)  # int ids and Circle-RoPE floats alike, as torch's .float()
    return np.ascontiguousarray(np.moveaxis(pos[channels], 0, -1))


class KVCache:
    """Rotated keys and values of every decoder layer for the tokens seen so far (generation only).

    Grown by concatenation, one step at a time: PyNative runs each step eagerly anyway, and a
    pre-allocated cache would need a write index per step for no gain on the CPU path.
    """

    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.states: list[tuple[Tensor, ...] | None] = [None] * num_layers
        """A recurrent layer's state after the tokens seen (its own tuple; hybrid models only)."""

    @property
    def length(self) -> int:
        """Tokens cached (the past_length of the next forward's attention layout)."""
        return next((int(k.shape[2]) for k in self.keys if k is not None), 0)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's k/v [B, Hkv, L, D] to layer `layer`'s; returns the whole [B, Hkv, past + L, D]."""
        if self.keys[layer] is not None:
            k = ops.cat((self.keys[layer], k), axis=2)
            v = ops.cat((self.values[layer], v), axis=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class TextAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, kernels: Kernels):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        bias = cfg.attention_bias
        self.gated = cfg.attention_output_gate
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim * (2 if self.gated else 1), bias)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias)
        # Qwen2.5-VL's o_proj has no bias even though q/k/v do; Qwen3-VL follows attention_bias.
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, bias and cfg.qk_norm)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels, cfg.zero_centered_norm)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels, cfg.zero_centered_norm)
        self.kernels = kernels

    def construct(
        self, x: Tensor, cos: Tensor, sin: Tensor, layout: TextAttentionLayout,
        cache: KVCache | None = None, layer_index: int = 0,
    ) -> Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.heads, -1)
        if self.gated:  # per head: [query | output gate]
            q, gate = q[..., : self.head_dim], q[..., self.head_dim :].reshape(b, length, -1)
        k = self.k_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, H, L, D]
        cos, sin = cos[:, None], sin[:, None]
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_index, k, v)
        out = text_attention(q, k, v, self.scale, layout, self.kernels)
        out = out.swapaxes(1, 2).reshape(b, length, self.heads * self.head_dim)
        if self.gated:
            out = out * ops.sigmoid(gate)
        return self.o_proj(out)


def apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] channels of x (all of them unless the rotary is partial)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return ops.cat((apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]), axis=-1)


class DecoderLayer(nn.Cell):
    """`linear_attn` given: a hybrid model's recurrent layer, which mixes tokens with it (it takes the layout,
    the cache and its index, not the rotary) instead of `self_attn`."""

    def __init__(self, cfg: TextConfig, kernels: Kernels, mlp: nn.Cell | None = None, linear_attn: nn.Cell | None = None):
        super().__init__()
        self.recurrent = linear_attn is not None
        if self.recurrent:
            self.linear_attn = linear_attn
        else:
            self.self_attn = TextAttention(cfg, kernels)
        self.mlp = mlp if mlp is not None else GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, cfg.zero_centered_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, cfg.zero_centered_norm)

    def construct(
        self, x: Tensor, cos: Tensor, sin: Tensor, layout: TextAttentionLayout,
        cache: KVCache | None = None, layer_index: int = 0,
    ) -> Tensor:
        if self.recurrent:
            x = x + self.linear_attn(self.input_layernorm(x), layout, cache, layer_index)
        else:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache, layer_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Cell):
    """`model.language_model`: embeddings, decoder layers, final norm (no head). `text_mlp(cfg, i)` may give
    layer i its own MLP cell (a family's MoE block, models/entry.py); None keeps the dense one.
    `linear_attention(cfg, kernels)` builds the token mixer of the `linear_attention` layers of
    `cfg.layer_types` (a hybrid family's)."""

    def __init__(self, cfg: TextConfig, kernels: Kernels, text_mlp=None, linear_attention=None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        mlps = [text_mlp(cfg, i) if text_mlp is not None else None for i in range(cfg.num_hidden_layers)]
        kinds = cfg.layer_types or ("full_attention",) * cfg.num_hidden_layers
        if "linear_attention" in kinds and linear_attention is None:
            raise ValueError("config.json's layer_types has linear_attention layers, but the family's MindSpore entry has no linear_attention cell")
        mixers = [linear_attention(cfg, kernels) if kind == "linear_attention" else None for kind in kinds]
        self.layers = nn.CellList([DecoderLayer(cfg, kernels, mlp, mixer) for mlp, mixer in zip(mlps, mixers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, cfg.zero_centered_norm)
        self.inv_freq = inv_freq(cfg.rope_theta, int(cfg.head_dim * cfg.partial_rotary_factor))
        self.channels = mrope_channels(cfg.mrope_section, cfg.mrope_interleaved)
        self.layer_uses_main = [True] * cfg.num_hidden_layers
        """AGE: False for layers that take the alt (plain M-RoPE) positions; see set_alt_layers."""
        self.recompute_every = 0
        """gradient_checkpointing: the first and every recompute_every-th block recompute (0 = none; layers.recomputes)."""

    def set_alt_layers(self, uses_main: list[bool]) -> None:
        """Circle-RoPE AGE: layer i rotates by `position_ids` if uses_main[i], else by `position_ids_alt`."""
        if len(uses_main) != len(self.layers):
            raise ValueError(f"AGE layer mask has {len(uses_main)} entries for {len(self.layers)} layers")
        self.layer_uses_main = list(uses_main)

    def set_age_mode(self, age_mode: str) -> None:
        """Circle-RoPE AGE `age_mode` over the layers with rotary positions: every layer, or a hybrid model's
        attention layers (its recurrent layers have no positions), as the torch adapter counts them."""
        rotary = attention_layer_indices(self.cfg.layer_types, len(self.layers))
        uses_main = [True] * len(self.layers)
        for layer, circle in zip(rotary, age_layer_mask(age_mode, len(rotary))):
            uses_main[layer] = circle
        self.set_alt_layers(uses_main)

    def cos_sin(self, position_ids: np.ndarray) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(Tensor(rotary_positions(position_ids, self.channels)), self.inv_freq)

    def construct(
        self,
        inputs_embeds: Tensor,
        position_ids: np.ndarray,
        layout: TextAttentionLayout,
        position_ids_alt: np.ndarray | None = None,
        deepstack: list[Tensor] | None = None,
        visual_index: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """inputs_embeds [B, L, H]; position_ids [3, B, L] (numpy); deepstack: one [n_visual, H] per
        leading layer, added at the visual positions (`visual_index` [B*L]: 0 = text, k = visual row k-1).
        `cache`: keys/values of the `layout.past_length` tokens before these, extended in place."""
        if cache is not None and cache.length != layout.past_length:
            raise ValueError(f"the KV cache holds {cache.length} tokens but the layout says past_length {layout.past_length}")
        main = self.cos_sin(position_ids)
        alt = None
        if not all(self.layer_uses_main):
            if position_ids_alt is None:
                raise RuntimeError(
                    "Circle-RoPE with AGE mixes layer kinds, but the batch has no position_ids_alt "
                    "(plain M-RoPE ids) for the M-RoPE layers"
                )
            alt = self.cos_sin(position_ids_alt)
        h = inputs_embeds
        b, length, hidden = h.shape
        for i, layer in enumerate(self.layers):
            cos, sin = main if self.layer_uses_main[i] else alt
            if recomputes(self, i):
                h = ms.recompute(layer, h, cos, sin, layout)
            else:
                h = layer(h, cos, sin, layout, cache, i)
            if deepstack is not None and i < len(deepstack):
                rows = ops.cat((ops.zeros((1, hidden), h.dtype), deepstack[i].astype(h.dtype)), axis=0)
                h = h + ops.gather(rows, visual_index, 0).reshape(b, length, hidden)
        return self.norm(h)
