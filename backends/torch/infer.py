"""Greedy generation with a transformers Qwen VL model from a numpy batch."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from vltune.core.contracts import Batch
from vltune.data.model_info import ModelInfo

from .batch import MODEL_INPUTS, to_model_inputs, to_tensor


@torch.no_grad()
def generate_greedy(model, batch: Batch, info: ModelInfo, max_new_tokens: int, autocast_dtype=None) -> list[list[int]]:
    """Continuation ids of each left-padded prompt row, cut at the first end token.

    transformers 5.x builds the 3D M-RoPE ids itself from `mm_token_type_ids` (0 text, 1 image,
    2 video) at prefill and continues from its rope_deltas while decoding with the KV cache.
    """
    device = next(model.parameters()).device
    model.eval()
    # position_ids stay out: generate() derives them (and their decode-time deltas) itself.
    inputs = to_model_inputs(batch, device, {k: v for k, v in MODEL_INPUTS.items() if k != "position_ids"}, model=model)
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


def _next_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the position of each row's next text token: max over its real tokens and channels, + 1."""
    masked = position_ids.masked_fill(attention_mask[None] == 0, torch.finfo(torch.float32).min if position_ids.is_floating_point() else torch.iinfo(position_ids.dtype).min)
    return masked.amax(dim=(0, 2)) + 1


@torch.no_grad()
def generate_with_positions(
    model, batch: Batch, max_new_tokens: int, adapter=None, use_cache: bool = True, autocast_dtype=None
) -> list[list[int]]:
    """Greedy decoding that keeps vltune's own position ids (Circle-RoPE, AGE alt ids) throughout.

    transformers' generate() would rebuild plain M-RoPE ids from its own get_rope_index, so this loop
    feeds `position_ids` (and `position_ids_alt`) itself: each new token sits at the row's next text
    position in *each* position set, which is the decode-time rope delta done right for both kinds of
    layer. `use_cache=False` recomputes the whole sequence every step (the reference for tests).
    """
    device = next(model.parameters()).device
    model.eval()
    inputs = to_model_inputs(batch, device, model=model)
    ids, attention, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    alt = to_tensor(batch["position_ids_alt"], device, torch.long) if "position_ids_alt" in batch else None
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    next_pos = _next_positions(positions, attention)
    next_alt = _next_positions(alt, attention) if alt is not None else None
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=device)

    batch_size = ids.shape[0]
    generated = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos, step_alt = ids, positions, alt
    for step in range(max_new_tokens):
        fresh = past is None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            context = adapter.alt_positions(step_alt) if adapter is not None else nullcontext()
            with context:
                out = model(
                    input_ids=step_ids, attention_mask=attention, position_ids=step_pos,
                    past_key_values=past, use_cache=use_cache, **(vision if fresh or not use_cache else {}),
                )
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(finished, eos[0], token)
        generated = torch.cat([generated, token[:, None]], dim=1)
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        new_pos = (next_pos + step).to(positions.dtype).view(1, -1, 1).expand(3, -1, 1)
        new_alt = (next_alt + step).to(alt.dtype).view(1, -1, 1).expand(3, -1, 1) if alt is not None else None
        if use_cache:
            past = out.past_key_values
            step_ids, step_pos, step_alt = token[:, None], new_pos, new_alt
        else:
            step_ids = torch.cat([step_ids, token[:, None]], dim=1)
            step_pos = torch.cat([step_pos, new_pos], dim=2)
            step_alt = torch.cat([step_alt, new_alt], dim=2) if alt is not None else None

    stop = set(eos.tolist())
    results = []
    for row in generated.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        results.append(row[:cut])
    return results
