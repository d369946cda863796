"""Greedy generation with a transformers Qwen VL model from a numpy batch."""

from __future__ import annotations

import torch

from vltune.core.contracts import Batch
from vltune.data.model_info import ModelInfo

from .batch import MODEL_INPUTS, to_model_inputs


@torch.no_grad()
def generate_greedy(model, batch: Batch, info: ModelInfo, max_new_tokens: int, autocast_dtype=None) -> list[list[int]]:
    """Continuation ids of each left-padded prompt row, cut at the first end token.

    transformers 5.x builds the 3D M-RoPE ids itself from `mm_token_type_ids` (0 text, 1 image,
    2 video) at prefill and continues from its rope_deltas while decoding with the KV cache.
    """
    device = next(model.parameters()).device
    model.eval()
    # position_ids stay out: generate() derives them (and their decode-time deltas) itself.
    inputs = to_model_inputs(batch, device, {k: v for k, v in MODEL_INPUTS.items() if k != "position_ids"})
    ids = inputs["input_ids"]
    mm_types = torch.zeros_like(ids, dtype=torch.int32)
    mm_types[ids == info.image_token_id] = 1
    mm_types[ids == info.video_token_id] = 2
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model.generate(**inputs, mm_token_type_ids=mm_types, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results
