"""Model-ready features of a realistic mixed workload, made directly in numpy (for `vltune bench`).

Speed depends on the shapes a batch carries, not on what the pixels show, so the benchmark skips
decoding and tokenising: each sample is a text of 64-1024 tokens (long-tailed), and in 80% of the
samples one image of 448-1280 px a side, sized by smart_resize exactly as the processor would, its
pad tokens placed between the span's opening and closing tokens (`<|vision_start|>` / `<|vision_end|>`,
Ovis2.5's image indicators) after a short prompt. The last 30%
of the text is the trained answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import Features
from .vision import smart_resize


@dataclass(frozen=True)
class WorkloadTokens:
    vocab: int
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def mixed_features(
    n_samples: int,
    tokens: WorkloadTokens,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch: int = 2,
    max_pixels: int = 1280 * 28 * 28,
    image_fraction: float = 0.8,
    seed: int = 0,
) -> list[Features]:
    rng = np.random.default_rng(seed)
    factor = patch_size * merge_size
    out = []
    for _ in range(n_samples):
        n_text = int(np.clip(rng.lognormal(np.log(256), 0.7), 64, 1024))
        text = rng.integers(1000, min(tokens.vocab, 150000), size=n_text)
        prompt, answer = text[: int(n_text * 0.7)], text[int(n_text * 0.7):]
        pixel_values = grid = None
        vision = np.zeros(0, dtype=np.int64)
        if rng.random() < image_fraction:
            h, w = (int(x) for x in rng.integers(448, 1281, size=2))
            rh, rw = smart_resize(h, w, factor, 56 * 56, max_pixels)
            gh, gw = rh // patch_size, rw // patch_size
            grid = np.array([[1, gh, gw]], dtype=np.int64)
            pixel_values = rng.standard_normal((gh * gw, 3 * temporal_patch * patch_size * patch_size), dtype=np.float32)
            vision = np.concatenate([[tokens.vision_start_token_id], np.full(gh * gw // merge_size**2, tokens.image_token_id), [tokens.vision_end_token_id]])
        input_ids = np.concatenate([prompt[:8], vision, prompt[8:], answer]).astype(np.int64)
        labels = np.full_like(input_ids, -100)
        labels[-len(answer):] = answer
        out.append(Features(input_ids, labels, pixel_values, grid))
    return out
