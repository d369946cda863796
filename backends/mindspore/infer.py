"""Greedy generation with a MindSpore Qwen VL model from a numpy batch (mirrors backends/torch/infer.py).

There is no KV cache yet: every step runs the whole sequence again (the torch backend's
`generate_with_positions(use_cache=False)` reference). Positions are vltune's own throughout: each new
token sits at its row's next text position (max over its real tokens and channels, + 1, then + 1 per
step) in `position_ids` and, with Circle-RoPE AGE, in `position_ids_alt` -- which is also what
transformers' generate() gives for plain M-RoPE (its rope_deltas), so both backends decode alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mindspore import nn

from vltune.core.contracts import Batch

from .models import ModelInputs


def end_token_ids(model_dir: str | Path, cfg) -> set[int]:
    """generation_config.json's eos_token_id (int or list), else the text config's."""
    path = Path(model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    if eos is None:
        text = cfg.raw.get("text_config") or cfg.raw
        eos = text.get("eos_token_id")
    if eos is None:
        raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or config.json")
    return set(eos if isinstance(eos, list) else [eos])


def next_positions(position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """[B] each row's next text position: max over its real tokens and the three channels, + 1."""
    pos = np.asarray(position_ids, dtype=np.float64)
    masked = np.where(attention_mask[None].astype(bool), pos, -np.inf)
    return masked.max(axis=(0, 2)) + 1


def generate_greedy(model: nn.Cell, batch: Batch, max_new_tokens: int, eos: set[int], causal: bool = True) -> list[list[int]]:
    """Continuation ids of each left-padded prompt row, cut at the first end token."""
    model.set_train(False)
    ids = np.asarray(batch["input_ids"])
    attention = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    positions = np.asarray(batch["position_ids"])
    alt = np.asarray(batch["position_ids_alt"]) if "position_ids_alt" in batch else None
    next_pos = next_positions(positions, attention)
    next_alt = next_positions(alt, attention) if alt is not None else None
    first_eos = min(eos)
    finished = np.zeros(ids.shape[0], dtype=bool)
    generated = []
    step_batch = dict(batch)
    for step in range(max_new_tokens):
        logits = model(ModelInputs.from_batch(step_batch, model.cfg, causal=causal), logits_to_keep=1)
        token = logits[:, -1].argmax(-1).asnumpy().astype(np.int64)
        token = np.where(finished, first_eos, token)
        generated.append(token)
        finished |= np.isin(token, list(eos))
        if finished.all():
            break
        step_batch["input_ids"] = np.concatenate([step_batch["input_ids"], token[:, None]], axis=1)
        step_batch["attention_mask"] = np.concatenate([step_batch.get("attention_mask", attention), np.ones_like(token[:, None])], axis=1)
        for key, start in (("position_ids", next_pos), ("position_ids_alt", next_alt)):
            if start is None:
                continue
            old = step_batch[key]
            new = np.broadcast_to((start + step).astype(old.dtype)[None, :, None], (3, len(token), 1))
            step_batch[key] = np.concatenate([old, new], axis=2)
    results = []
    for row in np.stack(generated, axis=1).tolist() if generated else [[] for _ in range(ids.shape[0])]:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results
