"""rope2d against an independent transcription of the original Qwen get_rope_index, on random layouts.

The reference below follows the loop of the released Qwen2-VL / Qwen2.5-VL / Qwen3-VL code
(transformers 4.5x): find each `<|vision_start|>`, decide image or video by the token after it, take
the next grid, continue text at max + 1. It shares no code with core/rope2d.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.rope2d import get_rope_index

VS, VE, IMG, VID = 90, 91, 92, 93
MERGE, TPS = 2, 2


def original_get_rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, model_type):
    if model_type == "qwen3_vl" and video_grid_thw is not None:
        video_grid_thw = np.repeat(video_grid_thw, video_grid_thw[:, 0], axis=0)
        video_grid_thw[:, 0] = 1
        second_per_grid_ts = None
    batch, length = input_ids.shape
    position_ids = np.ones((3, batch, length), dtype=np.int64)
    image_index = video_index = 0
    for i in range(batch):
        tokens = input_ids[i][attention_mask[i] == 1].tolist()
        starts = [j for j, tok in enumerate(tokens) if tok == VS]
        kinds = [tokens[j + 1] for j in starts]
        remain_images, remain_videos = kinds.count(IMG), kinds.count(VID)
        pieces, st = [], 0
        for _ in range(remain_images + remain_videos):
            ed_image = tokens.index(IMG, st) if remain_images > 0 else len(tokens) + 1
            ed_video = tokens.index(VID, st) if remain_videos > 0 else len(tokens) + 1
            if ed_image < ed_video:
                t, h, w = image_grid_thw[image_index]
                second_per_grid_t, ed = 0.0, ed_image
                image_index, remain_images = image_index + 1, remain_images - 1
            else:
                t, h, w = video_grid_thw[video_index]
                second_per_grid_t = second_per_grid_ts[video_index] if second_per_grid_ts is not None else 1.0
                ed = ed_video
                video_index, remain_videos = video_index + 1, remain_videos - 1
            gt, gh, gw = int(t), int(h) // MERGE, int(w) // MERGE
            text_len = ed - st
            st_idx = pieces[-1].max() + 1 if pieces else 0
            pieces.append(np.tile(np.arange(text_len), (3, 1)) + st_idx)
            if model_type == "qwen2_5_vl":
                t_index = (np.tile(np.arange(gt)[:, None], (1, gh * gw)) * second_per_grid_t * TPS).astype(np.int64).ravel()
            else:
                t_index = np.tile(np.arange(gt)[:, None], (1, gh * gw)).ravel()
            h_index = np.tile(np.arange(gh)[None, :, None], (gt, 1, gw)).ravel()
            w_index = np.tile(np.arange(gw)[None, None, :], (gt, gh, 1)).ravel()
            pieces.append(np.stack([t_index, h_index, w_index]) + text_len + st_idx)
            st = ed + gt * gh * gw
        if st < len(tokens):
            st_idx = pieces[-1].max() + 1 if pieces else 0
            pieces.append(np.tile(np.arange(len(tokens) - st), (3, 1)) + st_idx)
        position_ids[:, i, attention_mask[i] == 1] = np.concatenate(pieces, axis=1)
    return position_ids


def _random_row(rng, model_type):
    """One sequence of random text, images and videos: (tokens, image grids, video grids, seconds per grid)."""
    text = lambda n: list(rng.integers(10, 80, n))  # noqa: E731
    row, images, videos, spts = text(rng.integers(0, 6)), [], [], []
    for _ in range(rng.integers(0, 4)):
        t, h, w = int(rng.integers(1, 5)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))
        n = h * w // 4
        if rng.random() < 0.5:
            images.append([1, h, w])
            row += [VS] + [IMG] * n + [VE]
        else:
            videos.append([t, h, w])
            spts.append(float(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0])))
            if model_type == "qwen3_vl":  # one span per frame, each after its timestamp text
                for _ in range(t):
                    row += text(3) + [VS] + [VID] * n + [VE]
            else:
                row += [VS] + [VID] * (t * n) + [VE]
        row += text(rng.integers(0, 6))
    return row or text(1), images, videos, spts


def _grids(g):
    return np.array(g, dtype=np.int64).reshape(-1, 3) if g else None


def _random_batch(rng, model_type):
    rows, images, videos, spts = [], [], [], []
    for _ in range(rng.integers(1, 4)):
        row, i, v, s = _random_row(rng, model_type)
        rows.append(row)
        images, videos, spts = images + i, videos + v, spts + s
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    left = rng.random() < 0.5
    for b, row in enumerate(rows):
        cols = slice(length - len(row), length) if left else slice(0, len(row))
        ids[b, cols], mask[b, cols] = row, 1
    return ids, mask, _grids(images), _grids(videos), (spts or None)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_equals_original_algorithm_on_1000_random_layouts(model_type):
    rng = np.random.default_rng({"qwen2_vl": 1, "qwen2_5_vl": 2, "qwen3_vl": 3}[model_type])
    n_media = 0
    for _ in range(1000):
        ids, mask, images, videos, spts = _random_batch(rng, model_type)
        n_media += (0 if images is None else len(images)) + (0 if videos is None else len(videos))
        ours, _ = get_rope_index(
            ids, images, videos, spts, mask, model_type=model_type, spatial_merge_size=MERGE,
            image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, tokens_per_second=TPS,
        )
        theirs = original_get_rope_index(ids, images, None if videos is None else videos.copy(), spts, mask, model_type)
        keep = mask.astype(bool)
        assert np.array_equal(ours[:, keep], theirs[:, keep])
    assert n_media > 2000  # the layouts really mix many images and videos


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("circle", [None, {"alpha": 0.5, "radius": 10, "method": "circle", "move_to_origin": True}])
def test_packed_rows_restart_positions_per_sub_sequence(model_type, circle):
    from vltune.core.rope2d import get_rope_index_packed

    rng = np.random.default_rng(7)
    kw = dict(model_type=model_type, spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID,
              vision_start_token_id=VS, tokens_per_second=TPS, circle_rope=circle)
    for _ in range(50):
        samples = [_random_row(rng, model_type) for _ in range(rng.integers(1, 5))]
        singles = [get_rope_index(np.array([r]), _grids(i), _grids(v), s or None, **kw)[0][:, 0] for r, i, v, s in samples]
        row = np.concatenate([r for r, *_ in samples])
        cu = np.cumsum([0] + [len(r) for r, *_ in samples])
        packed, deltas = get_rope_index_packed(
            row[None], cu, _grids(sum((i for _, i, _, _ in samples), [])),
            _grids(sum((v for _, _, v, _ in samples), [])), sum((s for *_, s in samples), []) or None, **kw)
        assert packed.shape == (3, 1, len(row)) and deltas.shape == (len(samples), 1)
        assert np.array_equal(packed[:, 0], np.concatenate(singles, axis=1))


def test_packed_rejects_bad_cu_seqlens():
    from vltune.core.rope2d import get_rope_index_packed

    with pytest.raises(ValueError, match="cu_seqlens"):
        get_rope_index_packed(np.zeros((1, 5), dtype=np.int64), [0, 3, 4], model_type="qwen2_vl",
                              spatial_merge_size=2, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS)
