"""Qwen2.5-VL and Qwen3-VL for conditional generation in MindSpore: vision tower + language model + head.

The module tree (and so every parameter name) is transformers 5's: `model.visual.*`,
`model.language_model.*`, `lm_head.weight` (absent when the head is tied to the embedding).

A forward takes `ModelInputs`, built once per numpy batch (core.contracts.Batch) on the host: the
token ids, the position ids, the attention layout, the pixels, and the index that puts each vision
token's features in place of its pad token (a gather over [text rows; image rows; video rows],
which is differentiable and has kernels on CPU and Ascend alike, unlike a masked scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops

from vltune.core.contracts import Batch

from ..attention import Kernels, TextAttentionLayout
from .config import VLConfig
from .entry import model_entry
from .layers import Linear
from .text import KVCache, TextModel
from .vision import VisionTransformer


@dataclass
class ModelInputs:
    """One batch, ready for the MindSpore model. Arrays stay numpy where only the host reads them."""

    input_ids: Tensor
    """[B, L] int32."""
    position_ids: np.ndarray
    """[3, B, L] (ints, or Circle-RoPE floats)."""
    layout: TextAttentionLayout
    position_ids_alt: np.ndarray | None = None
    pixel_values: Tensor | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: Tensor | None = None
    video_grid_thw: np.ndarray | None = None
    embed_index: Tensor | None = None
    """[B*L] int32 into concat(text embeddings [B*L], image tokens, video tokens); None without media."""
    visual_index: Tensor | None = None
    """[B*L] int32 into concat(zero row, image tokens, video tokens), for DeepStack."""

    @classmethod
    def from_batch(cls, batch: Batch, cfg: VLConfig, causal: bool = True) -> "ModelInputs":
        ids = np.asarray(batch["input_ids"])
        b, length = ids.shape
        if "cu_seqlens" in batch and b != 1:
            raise ValueError(f"a packed batch (cu_seqlens) must have one row, got {b}")
        layout = TextAttentionLayout(
            b, length, causal=causal,
            padding=np.asarray(batch["attention_mask"]) if "attention_mask" in batch else None,
            cu_seqlens=np.asarray(batch["cu_seqlens"]) if "cu_seqlens" in batch else None,
        )
        position_ids = batch.get("position_ids")
        if position_ids is None:  # text-only without precomputed ids: 0..L-1 on all three rows
            position_ids = np.broadcast_to(np.arange(length), (3, b, length))
        flat = ids.reshape(-1)
        image_pos = np.flatnonzero(flat == cfg.image_token_id)
        video_pos = np.flatnonzero(flat == cfg.video_token_id)
        merge2 = cfg.vision.spatial_merge_size**2

        def n_tokens(grid_key: str) -> int:
            return int(np.prod(batch[grid_key], axis=-1).sum()) // merge2 if grid_key in batch else 0

        n_img, n_vid = n_tokens("image_grid_thw"), n_tokens("video_grid_thw")
        for kind, pos, n in (("image", image_pos, n_img), ("video", video_pos, n_vid)):
            if len(pos) != n:
                raise ValueError(f"{kind} features and {kind} tokens do not match: {len(pos)} tokens, {n} features")
        embed_index = visual_index = None
        if n_img or n_vid:
            index = np.arange(b * length)
            index[image_pos] = b * length + np.arange(n_img)
            index[video_pos] = b * length + n_img + np.arange(n_vid)
            embed_index = Tensor(index.astype(np.int32))
            vis = np.zeros(b * length, dtype=np.int32)
            vis[image_pos] = 1 + np.arange(n_img)
            vis[video_pos] = 1 + n_img + np.arange(n_vid)
            visual_index = Tensor(vis)
        as_f32 = lambda key: Tensor(np.ascontiguousarray(batch[key], dtype=np.float32)) if key in batch else None  # noqa: E731
        return cls(
            input_ids=Tensor(ids.astype(np.int32)),
            position_ids=np.asarray(position_ids),
            layout=layout,
            position_ids_alt=np.asarray(batch["position_ids_alt"]) if "position_ids_alt" in batch else None,
            pixel_values=as_f32("pixel_values"),
            image_grid_thw=np.asarray(batch["image_grid_thw"]) if "image_grid_thw" in batch else None,
            pixel_values_videos=as_f32("pixel_values_videos"),
            video_grid_thw=np.asarray(batch["video_grid_thw"]) if "video_grid_thw" in batch else None,
            embed_index=embed_index,
            visual_index=visual_index,
        )


class QwenVLModel(nn.Cell):
    """`model`: the vision tower and the language model."""

    def __init__(self, cfg: VLConfig, kernels: Kernels):
        super().__init__()
        self.cfg = cfg
        entry = model_entry(cfg.model_type)
        self.visual = VisionTransformer(cfg.vision, kernels, qwen3=entry.siglip_tower, plain=entry.plain_vit)
        self.language_model = TextModel(cfg.text, kernels, entry.text_mlp, entry.linear_attention)

    def construct(self, inputs: ModelInputs, cache: KVCache | None = None) -> Tensor:
        embeds = self.language_model.embed_tokens(inputs.input_ids)
        b, length, hidden = embeds.shape
        deepstack = None
        if inputs.embed_index is not None:
            outputs = []
            if inputs.pixel_values is not None:
                outputs.append(self.visual(inputs.pixel_values, inputs.image_grid_thw))
            if inputs.pixel_values_videos is not None:
                outputs.append(self.visual(inputs.pixel_values_videos, inputs.video_grid_thw))
            rows = [embeds.reshape(b * length, hidden)] + [o.embeds.astype(embeds.dtype) for o in outputs]
            embeds = ops.gather(ops.cat(rows, axis=0), inputs.embed_index, 0).reshape(b, length, hidden)
            if outputs[0].deepstack:
                deepstack = [ops.cat(taps, axis=0) if len(taps) > 1 else taps[0] for taps in zip(*(o.deepstack for o in outputs))]
        return self.language_model(
            embeds, inputs.position_ids, inputs.layout, inputs.position_ids_alt, deepstack, inputs.visual_index, cache
        )


class QwenVLForConditionalGeneration(nn.Cell):
    """The whole model: `model` + `lm_head` (or the embedding matrix when tied). Returns logits [B, L, V]."""

    model_cls = QwenVLModel
    """The `model` cell; a family with another module tree (Ovis2.5) subclasses with its own."""

    def new_cache(self) -> KVCache:
        """An empty KV cache for one generation (prefill, then one token per step)."""
        return KVCache(self.cfg.text.num_hidden_layers)

    def __init__(self, cfg: VLConfig, kernels: Kernels):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        self.model = self.model_cls(cfg, kernels)
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self._matmul = ops.MatMul(transpose_b=True)

    def head(self, hidden: Tensor) -> Tensor:
        if not self.tied:
            return self.lm_head(hidden)
        weight = self.model.language_model.embed_tokens.weight
        shape = hidden.shape
        return self._matmul(hidden.reshape(-1, shape[-1]), weight.astype(hidden.dtype)).reshape(*shape[:-1], -1)

    def construct(self, inputs: ModelInputs, logits_to_keep: int = 0, cache: KVCache | None = None) -> Tensor:
        """Logits of the last `logits_to_keep` positions (0: all); `cache` (generation) is extended in place."""
        hidden = self.model(inputs, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.head(hidden)

    def to_dtype(self, dtype) -> None:
        """Cast every parameter (e.g. to bf16 on Ascend); CPU runs stay fp32."""
        for param in self.get_parameters():
            if param.dtype != dtype:
                param.set_dtype(dtype)
