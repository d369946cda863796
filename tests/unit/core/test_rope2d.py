"""rope2d: REFERENCE.md's test vectors and transformers' own get_rope_index on image/text layouts."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.rope2d import get_rope_index

T, VS, VE, IMG, VID = 5, 90, 91, 92, 93  # arbitrary ids: positions depend only on the layout
IDS = dict(spatial_merge_size=2, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS)


def test_image_vector():
    ids = np.array([[T, T, VS, IMG, IMG, IMG, IMG, VE, T, T]])
    pos, delta = get_rope_index(ids, np.array([[1, 4, 4]]), model_type="qwen2_5_vl", **IDS)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 5, 6, 7]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 6, 7]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert delta.tolist() == [[8 - 10]]


@pytest.mark.parametrize(
    "model_type, spt, expected_t",
    [("qwen2_5_vl", 1.0, [2, 4, 6, 8]), ("qwen2_5_vl", 0.5, [2, 3, 4, 5]), ("qwen2_5_vl", 0.25, [2, 2, 3, 3]), ("qwen2_vl", 1.0, [2, 3, 4, 5])],
)
def test_video_vector(model_type, spt, expected_t):
    ids = np.array([[T, VS] + [VID] * 16 + [VE, T]])
    pos, _ = get_rope_index(ids, None, np.array([[4, 4, 4]]), [spt], model_type=model_type, **IDS)
    frames = pos[0, 0, 2:18].reshape(4, 4)
    assert frames[:, 0].tolist() == expected_t and (frames == frames[:, :1]).all()
    last_vision = int(pos[:, 0, 2:18].max())
    assert pos[0, 0, 18:].tolist() == [last_vision + 1, last_vision + 2]


def test_padding_is_ignored_left_and_right():
    row = [T, T, VS, IMG, IMG, IMG, IMG, VE, T]
    grid = np.array([[1, 4, 4]])
    plain, _ = get_rope_index(np.array([row]), grid, model_type="qwen2_5_vl", **IDS)
    for left in (True, False):
        ids = np.array([[0, 0] + row]) if left else np.array([row + [0, 0]])
        mask = (np.arange(11) >= 2) if left else (np.arange(11) < 9)
        pos, _ = get_rope_index(ids, grid, attention_mask=mask[None].astype(int), model_type="qwen2_5_vl", **IDS)
        assert np.array_equal(pos[:, :, mask], plain)


def test_text_only_row_is_arange():
    pos, delta = get_rope_index(np.full((2, 6), T), model_type="qwen3_vl", **IDS)
    assert (pos == np.arange(6)).all() and (delta == 0).all()


def test_matches_transformers_on_image_layouts(tiny_model_dirs):
    """Random batches of text and images (1-3 per row, padded) against the stock model's get_rope_index."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    for model_type, path in tiny_model_dirs.items():
        model = transformers.AutoModelForImageTextToText.from_pretrained(path)
        cfg = model.config
        ids_kw = dict(
            spatial_merge_size=2, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
        )
        for _ in range(25):
            rows, grids = [], []
            for _ in range(3):
                row = list(rng.integers(10, 50, rng.integers(1, 6)))
                for _ in range(rng.integers(0, 4)):
                    t, h, w = 1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))
                    grids.append([t, h, w])
                    row += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
                    row += list(rng.integers(10, 50, rng.integers(0, 5)))
                rows.append(row)
            length = max(map(len, rows))
            ids = np.zeros((3, length), dtype=np.int64)
            mask = np.zeros_like(ids)
            for b, row in enumerate(rows):
                ids[b, length - len(row):] = row
                mask[b, length - len(row):] = 1
            grid = np.array(grids, dtype=np.int64).reshape(-1, 3) if grids else None
            ours, our_delta = get_rope_index(ids, grid, attention_mask=mask, model_type=model_type, **ids_kw)
            tids = torch.as_tensor(ids)
            theirs, their_delta = model.model.get_rope_index(
                tids, mm_token_type_ids=(tids == cfg.image_token_id).int(),
                image_grid_thw=None if grid is None else torch.as_tensor(grid), attention_mask=torch.as_tensor(mask),
            )
            keep = mask.astype(bool)
            assert np.array_equal(ours[:, keep], theirs.numpy()[:, keep]), model_type
            assert np.array_equal(our_delta, their_delta.numpy()), model_type


CIRCLE = {"alpha": 0.5, "radius": 10, "method": "circle", "move_to_origin": True, "AGE_mode": "strategy_4"}


def test_circle_rope_places_rings_and_continues_text_at_max_plus_one():
    from vltune.core.circle_rope import circle_rope_positions

    ids = np.array([[T, T, VS, IMG, IMG, IMG, IMG, VE, T, T]])
    pos, delta = get_rope_index(ids, np.array([[1, 4, 4]]), model_type="qwen2_5_vl", circle_rope=CIRCLE, **IDS)
    assert pos.dtype == np.float64
    assert (pos[:, 0, :3] == np.arange(3)).all()
    ring = circle_rope_positions(1, 2, 2, CIRCLE) + 3
    assert np.allclose(pos[:, 0, 3:7], ring)
    after = ring.max() + 1
    assert np.allclose(pos[:, 0, 7:], after + np.arange(3))
    assert delta[0, 0] == pytest.approx(after + 2 + 1 - 10)


def test_circle_rope_video_frames_are_rings_offset_along_the_text_axis():
    from vltune.core.circle_rope import circle_rope_positions

    ids = np.array([[T, VS] + [VID] * 12 + [VE, T]])
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        pos, _ = get_rope_index(ids, None, np.array([[3, 4, 4]]), [1.0], model_type=model_type, circle_rope=CIRCLE, **IDS)
        frames = pos[:, 0, 2:14].reshape(3, 3, 4)  # [channel, frame, token]
        for f in range(3):
            assert np.allclose(frames[:, f], circle_rope_positions(1, 2, 2, CIRCLE) + 2 + f * 1.0)
