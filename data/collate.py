"""Features -> one padded numpy batch laid out as DESIGN.md's batch contract."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.circle_rope import age_layer_mask
from ..core.contracts import IGNORE_INDEX, Batch
from ..core.rope2d import get_rope_index
from .dataset import Features
from .model_info import ModelInfo


def vision_arrays(features: list[Features]) -> Batch:
    """The batch's image and video arrays: every sample's patches and grids concatenated in order (into the
    target dtype directly: a 47 MB row of patches is copied once, not concatenated and then cast)."""
    out: Batch = {}
    with_images = [f for f in features if f.pixel_values is not None]
    if with_images:
        out["pixel_values"] = np.concatenate([f.pixel_values for f in with_images], dtype=np.float32)
        out["image_grid_thw"] = np.concatenate([f.image_grid_thw for f in with_images]).astype(np.int64)
    with_videos = [f for f in features if f.pixel_values_videos is not None]
    if with_videos:
        out["pixel_values_videos"] = np.concatenate([f.pixel_values_videos for f in with_videos], dtype=np.float32)
        out["video_grid_thw"] = np.concatenate([f.video_grid_thw for f in with_videos]).astype(np.int64)
        out["second_per_grid_ts"] = np.concatenate([f.second_per_grid_ts for f in with_videos]).astype(np.float32)
    return out


def rope_kwargs(batch: Batch, info: ModelInfo, **extra) -> dict:
    """The keyword arguments of core.rope2d's get_rope_index(_packed) for this batch and model."""
    return dict(
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        second_per_grid_ts=batch.get("second_per_grid_ts"),
        model_type=info.model_type,
        spatial_merge_size=info.spatial_merge_size,
        image_token_id=info.image_token_id,
        video_token_id=info.video_token_id,
        vision_start_token_id=info.vision_start_token_id,
        tokens_per_second=info.tokens_per_second,
        **extra,
    )


def collate_padded(
    features: list[Features],
    info: ModelInfo,
    pad_token_id: int,
    padding_side: str = "right",
    circle_rope: dict | None = None,
) -> Batch:
    """Pad to the longest row; add attention_mask, 3D position ids and the vision arrays.

    Left padding is for generation (every prompt ends at the same column); training pads right.
    With `circle_rope`, `position_ids` are the Circle-RoPE ids (floats) and, when its AGE strategy
    keeps some decoder layers on plain M-RoPE, `position_ids_alt` carries the plain ids for them.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
    length = max(len(f.input_ids) for f in features)
    batch_size = len(features)
    input_ids = np.full((batch_size, length), pad_token_id, dtype=np.int64)
    labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((batch_size, length), dtype=np.int64)
    for row, f in enumerate(features):
        n = len(f.input_ids)
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = f.input_ids
        labels[row, cols] = f.labels
        attention_mask[row, cols] = 1

    batch: Batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    batch.update(vision_arrays(features))
    rope = rope_kwargs(batch, info, attention_mask=attention_mask)
    batch["position_ids"], batch["rope_deltas"] = get_rope_index(input_ids, circle_rope=circle_rope, **rope)
    if circle_rope and not all(age_layer_mask(circle_rope.get("AGE_mode", "strategy_1"), info.rotary_layers)):
        batch["position_ids_alt"], batch["rope_deltas_alt"] = get_rope_index(input_ids, **rope)
    return batch


@dataclass
class Collator:
    """collate_padded with a model's settings bound: what the loader, evaluator and infer call."""

    info: ModelInfo
    pad_token_id: int
    circle_rope: dict | None = None

    def __call__(self, features: list[Features], padding_side: str = "right") -> Batch:
        return collate_padded(features, self.info, self.pad_token_id, padding_side, self.circle_rope)
