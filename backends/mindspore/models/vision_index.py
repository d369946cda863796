"""Host-side (numpy) index arithmetic of the Qwen VL vision towers, from `grid_thw` alone.

These are the data-dependent pieces transformers computes in `vision_utils` (per-frame attention
segments, merge-block patch coordinates, Qwen2.5-VL's window order, Qwen3-VL's bilinear resampling
of the learned position grid). They depend only on the grids, never on weights, so they are computed
once per batch in numpy and handed to the MindSpore cells as index tensors.
"""

from __future__ import annotations

import numpy as np


def _grids(grid_thw: np.ndarray) -> list[tuple[int, int, int]]:
    return [(int(t), int(h), int(w)) for t, h, w in np.asarray(grid_thw).reshape(-1, 3)]


def frame_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """[n_frames + 1] cumulative patch counts: every frame of every image/video is one attention segment."""
    lengths = [h * w for t, h, w in _grids(grid_thw) for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def patch_coordinates(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[n_patches, 2] (row, col) of each patch in the processor's merge-block order, repeated per frame."""
    out = []
    for t, h, w in _grids(grid_thw):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def window_index(grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window attention: (order of merged tokens grouped by window, cu_window_seqlens in patches)."""
    window = window_size // merge // patch_size
    unit = merge * merge
    index, cu, offset = [], [0], 0
    for t, h, w in _grids(grid_thw):
        gh, gw = h // merge, w // merge
        ids = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = window - gh % window, window - gw % window
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        padded = np.pad(ids, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, window, window)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # torch.unique_consecutive
    return np.concatenate(index).astype(np.int64), cu[keep]


def bilinear_position_taps(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL: resample the learned (side x side) position grid to each image's grid.

    Returns (indices [n_patches, 4] into the flattened table, weights [n_patches, 4] fp32), the
    bilinear, align_corners=True taps of transformers' `get_vision_interpolation_indices_and_weights`,
    with its fp32 arithmetic, in merge-block patch order.
    """
    rows, cols = patch_coordinates(grid_thw, merge).T
    heights = np.concatenate([np.full(t * h * w, h) for t, h, w in _grids(grid_thw)])
    widths = np.concatenate([np.full(t * h * w, w) for t, h, w in _grids(grid_thw)])

    def axis(index: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
        return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)

    h_taps, h_w = axis(rows, heights)
    w_taps, w_w = axis(cols, widths)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).astype(np.float32)
    return indices.astype(np.int64), weights
