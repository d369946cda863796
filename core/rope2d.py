"""Qwen's 3D M-RoPE position ids ("rope2d"), computed in numpy for both backends.

This follows the original Qwen algorithm (the one the released models were trained with): text
after a vision span continues from max(all three rows so far) + 1. transformers 5.x continues from
`start + max(h, w) / merge` instead, which is the same for images but differs after a *video* whose
temporal ids outgrow its spatial ids; vltune keeps the original.

Per sequence: a cursor walks the tokens. For each media item (in order) the text before it gets
s + arange(text_len) on all three rows, then the item's (t, h, w) grid gets
T = t_index + s', H = row + s', W = col + s' with s' = s + text_len.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .circle_rope import circle_rope_positions
from .families import PositionRule, get_family


def _vision_ids(t: int, h: int, w: int, t_index: np.ndarray, start: int) -> np.ndarray:
    """[3, t*h*w] ids of one merged grid in (t, h, w) order, offset by `start`."""
    tt = np.repeat(t_index, h * w)
    hh = np.tile(np.repeat(np.arange(h), w), t)
    ww = np.tile(np.arange(w), t * h)
    return np.stack([tt, hh, ww]) + start


def _media_items(
    ids: np.ndarray,
    rule: PositionRule,
    image_grid_thw: Sequence,
    video_grid_thw: Sequence,
    second_per_grid_ts: Sequence | None,
    image_token_id: int,
    video_token_id: int,
    tokens_per_second: float,
    counters: list[int],
) -> list[tuple[int, int, int, int, np.ndarray]]:
    """(start, t, h, w, temporal_index) for every media span of one unpadded row, in order.

    `counters` = [next image, next video] indexes into the batch-level grid lists, advanced in place,
    because grids are listed for the whole batch in row order.
    """
    items = []
    pos = 0
    n = len(ids)
    while pos < n:
        tok = ids[pos]
        if tok != image_token_id and tok != video_token_id:
            pos += 1
            continue
        is_video = tok == video_token_id
        if is_video:
            t, h, w = (int(x) for x in video_grid_thw[counters[1]])
            spt = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[counters[1]])
            counters[1] += 1
        else:
            t, h, w = (int(x) for x in image_grid_thw[counters[0]])
            spt = 0.0
            counters[0] += 1
        if rule.video_time == "seconds":
            t_index = (np.arange(t) * spt * tokens_per_second).astype(np.int64)
        else:
            t_index = np.arange(t)
        items.append((pos, t, h, w, t_index))
        pos += t * h * w  # h, w here are already merged
    return items


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    model_type: str,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    tokens_per_second: float = 2,
    circle_rope: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (position_ids [3, B, L], rope_deltas [B, 1]): int64, or float64 with `circle_rope`.

    A family with 1-D positions (`PositionRule.rotary` "text") gets 0, 1, 2, ... over each row's tokens
    in all three rows, deltas 0.

    `image_grid_thw` / `video_grid_thw` are the *patch* grids of the processor ([n, 3], unmerged h, w),
    listed for the whole batch in order. Padded positions (attention_mask == 0) get id 0, as in
    transformers 5.x. For Qwen3-VL each video frame group is its own item with t = 1 (the timestamps live
    in the text), so its grids are split here.

    With `circle_rope` (the recipe's dict, see core/circle_rope.py) every media grid is placed as a
    Circle-RoPE ring: positions P + text_len + s, and the next text starts at max(all channels) + 1,
    a float, as the reference implementation does. Text positions are unchanged.
    """
    rule = get_family(model_type, "get_rope_index model_type").position
    del vision_start_token_id  # spans are found from the pad tokens themselves
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    m = spatial_merge_size

    def merged(grids):
        if grids is None or len(grids) == 0:
            return []
        g = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        return [(t, h // m, w // m) for t, h, w in g]

    images = merged(image_grid_thw)
    videos = merged(video_grid_thw)
    spts = None if second_per_grid_ts is None else list(second_per_grid_ts)
    if rule.video_time == "per_frame" and videos:
        videos = [(1, h, w) for t, h, w in videos for _ in range(t)]
        spts = None

    if rule.rotary == "text":  # 1-D positions (Ovis2.5): every token, media included, one step; rows equal
        if circle_rope:
            raise ValueError(f"Circle-RoPE needs M-RoPE positions; {model_type} has 1-D text positions")
        ids_1d = np.where(mask.astype(bool), np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        return np.broadcast_to(ids_1d, (3, batch, length)).copy(), np.zeros((batch, 1), dtype=np.int64)

    dtype = np.float64 if circle_rope else np.int64
    position_ids = np.zeros((3, batch, length), dtype=dtype)
    deltas = np.zeros((batch, 1), dtype=dtype)
    counters = [0, 0]
    for b in range(batch):
        keep = mask[b].astype(bool)
        ids = input_ids[b][keep]
        items = _media_items(
            ids, rule, images, videos, spts, image_token_id, video_token_id, tokens_per_second, counters
        )
        pieces = []
        cursor = 0
        next_id = 0
        for start, t, h, w, t_index in items:
            text_len = start - cursor
            pieces.append(np.broadcast_to(np.arange(text_len) + next_id, (3, text_len)))
            if circle_rope:
                # The ring is centred on the text axis at the next text index; time lives in the
                # ring's per-frame offset (circle_rope.py), not in tokens_per_second spacing.
                vision = circle_rope_positions(t, h, w, circle_rope) + (next_id + text_len)
            else:
                vision = _vision_ids(t, h, w, t_index, next_id + text_len)
            pieces.append(vision)
            next_id = vision.max() + 1
            cursor = start + t * h * w
        tail = len(ids) - cursor
        pieces.append(np.broadcast_to(np.arange(tail) + next_id, (3, tail)))
        row = np.concatenate(pieces, axis=1)
        position_ids[:, b, keep] = row
        deltas[b, 0] = (row.max() + 1 - len(ids)) if row.size else 0
    return position_ids, deltas


def get_rope_index_packed(
    input_ids: np.ndarray,
    cu_seqlens: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids of a packed row ([1, L], sub-sequences at `cu_seqlens`): each restarts at 0.

    The sub-sequences are laid out as the rows of a right-padded batch, so the grids, which are
    listed in order, are consumed sub-sequence by sub-sequence exactly as they are row by row.
    Returns (position_ids [3, 1, L], rope_deltas [N, 1]) with the keyword arguments of get_rope_index.
    """
    row = np.asarray(input_ids).reshape(-1)
    bounds = np.asarray(cu_seqlens, dtype=np.int64)
    if bounds[0] != 0 or bounds[-1] != len(row) or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"cu_seqlens {bounds.tolist()} must rise from 0 to the row length {len(row)}")
    lengths = np.diff(bounds)
    rows = np.zeros((len(lengths), lengths.max()), dtype=row.dtype)
    mask = np.zeros_like(rows)
    for i, (start, n) in enumerate(zip(bounds[:-1], lengths)):
        rows[i, :n], mask[i, :n] = row[start : start + n], 1
    positions, deltas = get_rope_index(rows, image_grid_thw, video_grid_thw, second_per_grid_ts, mask, **kwargs)
    return positions[:, mask.astype(bool)][:, None, :], deltas
