"""Position ids equal transformers' own `get_rope_index` of the family's model, for padded rows of
text and images and for videos (with the family's video placeholders); for a family with 1-D positions
(Ovis2.5), the ids transformers' generation derives from the attention mask."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.rope2d import get_rope_index

torch = pytest.importorskip("torch")


def _theirs(model, ids, mask, image_grid, video_grid, spts, cfg):
    """transformers' get_rope_index, called as the family's forward calls it; for a model with 1-D
    positions (no get_rope_index), the ids generation derives from the attention mask, in three rows."""
    import inspect

    tids = torch.as_tensor(ids)
    if not hasattr(model.model, "get_rope_index"):
        positions = model._prepare_position_ids_for_generation(tids, {"attention_mask": torch.as_tensor(mask)})
        return np.broadcast_to(positions.numpy(), (3, *ids.shape)), np.zeros((len(ids), 1), dtype=np.int64)
    kwargs = {"attention_mask": torch.as_tensor(mask)}
    params = inspect.signature(model.model.get_rope_index).parameters
    if "mm_token_type_ids" in params:
        types = torch.zeros_like(tids)
        types[tids == cfg.image_token_id] = 1
        types[tids == cfg.video_token_id] = 2
        kwargs["mm_token_type_ids"] = types.int()
    if image_grid is not None:
        kwargs["image_grid_thw"] = torch.as_tensor(image_grid)
    if video_grid is not None:
        kwargs["video_grid_thw"] = torch.as_tensor(video_grid)
        if "second_per_grid_ts" in params and spts is not None:
            kwargs["second_per_grid_ts"] = torch.as_tensor(spts)
    positions, deltas = model.model.get_rope_index(tids, **kwargs)
    return positions.numpy(), deltas.numpy()


def _span(cfg, video: bool) -> tuple[int, int]:
    """The ids that open and close an image's / a video's span (Ovis2.5: its indicator tokens)."""
    if hasattr(cfg, "image_start_token_id"):
        return (cfg.video_start_token_id, cfg.video_end_token_id) if video else (cfg.image_start_token_id, cfg.image_end_token_id)
    return cfg.vision_start_token_id, cfg.vision_end_token_id


def _video_tokens(spec, cfg, t, h, w, rng):
    """A video span as the family's processor writes it (h, w merged)."""
    if spec.media.video_placeholder == "pads":
        opening, closing = _span(cfg, video=True)
        return [opening] + [cfg.video_token_id] * (t * h * w) + [closing]
    out = [cfg.vision_start_token_id]
    for _ in range(t):  # timestamp text, then each frame group in its own vision span
        out += list(rng.integers(10, 50, 3)) + [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w) + [cfg.vision_end_token_id]
    return out + [cfg.vision_end_token_id]


@pytest.mark.parametrize("with_video", [False, True], ids=["images", "video"])
def test_position_ids_equal_transformers(family, spec, torch_model, with_video):
    cfg = torch_model.config
    merge = cfg.vision_config.spatial_merge_size
    rng = np.random.default_rng(0)
    for _ in range(10):
        rows, images, videos, spts = [], [], [], []
        for _ in range(3):
            row = list(rng.integers(10, 50, rng.integers(1, 6)))
            for _ in range(rng.integers(0, 3)):
                h, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
                if with_video and rng.random() < 0.5:
                    # Time never outgrows space (temporal ids <= max(h, w) - 1): there the
                    # original Qwen rule (vltune's) and transformers 5's continuation agree; where they
                    # differ is tests/unit/core/test_rope2d_original.py's subject.
                    h, w = int(rng.integers(2, 6)), int(rng.integers(2, 6))
                    t = int(rng.integers(1, (max(h, w) - 1) // 2 + 2))  # 2 s per frame group: ids up to 2(t-1)
                    videos.append([t, h * merge, w * merge])
                    spts.append(float(rng.choice([0.5, 1.0])))
                    row += _video_tokens(spec, cfg, t, h, w, rng)
                else:
                    images.append([1, h * merge, w * merge])
                    opening, closing = _span(cfg, video=False)
                    row += [opening] + [cfg.image_token_id] * (h * w) + [closing]
                row += list(rng.integers(10, 50, rng.integers(0, 4)))
            rows.append(row)
        length = max(map(len, rows))
        ids = np.zeros((len(rows), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, row in enumerate(rows):
            ids[b, length - len(row):] = row
            mask[b, length - len(row):] = 1
        image_grid = np.array(images, dtype=np.int64) if images else None
        video_grid = np.array(videos, dtype=np.int64) if videos else None
        ours, our_deltas = get_rope_index(
            ids, image_grid, video_grid, spts or None, mask, model_type=family, spatial_merge_size=merge,
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            vision_start_token_id=_span(cfg, video=False)[0],
            tokens_per_second=getattr(cfg.vision_config, "tokens_per_second", 2),
        )
        theirs, their_deltas = _theirs(torch_model, ids, mask, image_grid, video_grid, spts or None, cfg)
        keep = mask.astype(bool)
        assert np.array_equal(ours[:, keep], theirs[:, keep]), family
        assert np.array_equal(our_deltas.reshape(-1), their_deltas.reshape(-1)), family
