"""Features -> one padded numpy batch laid out as DESIGN.md's batch contract."""

from __future__ import annotations

import numpy as np

from ..core.contracts import IGNORE_INDEX, Batch
from ..core.rope2d import get_rope_index
from .dataset import Features
from .model_info import ModelInfo


def collate_padded(features: list[Features], info: ModelInfo, pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest row; add attention_mask, 3D M-RoPE position_ids and the vision arrays.

    Left padding is for generation (every prompt ends at the same column); training pads right.
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
    with_images = [f for f in features if f.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = np.concatenate([f.pixel_values for f in with_images]).astype(np.float32)
        batch["image_grid_thw"] = np.concatenate([f.image_grid_thw for f in with_images]).astype(np.int64)
    position_ids, rope_deltas = get_rope_index(
        input_ids,
        batch.get("image_grid_thw"),
        attention_mask=attention_mask,
        model_type=info.model_type,
        spatial_merge_size=info.spatial_merge_size,
        image_token_id=info.image_token_id,
        video_token_id=info.video_token_id,
        vision_start_token_id=info.vision_start_token_id,
        tokens_per_second=info.tokens_per_second,
    )
    batch["position_ids"] = position_ids
    batch["rope_deltas"] = rope_deltas
    return batch
