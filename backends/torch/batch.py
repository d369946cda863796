"""numpy batch (core.contracts.Batch) -> the tensors a transformers Qwen VL forward takes."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from vltune.core.contracts import Batch

# Batch keys the transformers forward takes, and their dtypes. `labels` stay out: vltune computes
# the loss itself so it can normalise over the whole accumulated batch.
MODEL_INPUTS = {
    "input_ids": torch.long,
    "attention_mask": torch.long,
    "position_ids": torch.long,  # float32 when the ids are floats (Circle-RoPE)
    "pixel_values": torch.float32,
    "image_grid_thw": torch.long,
    "pixel_values_videos": torch.float32,
    "video_grid_thw": torch.long,
    "second_per_grid_ts": torch.float32,  # Qwen2/2.5-VL only; dropped for models whose forward lacks it
}


def to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.long and np.issubdtype(array.dtype, np.floating):
        dtype = torch.float32  # Circle-RoPE positions are fractional
    return torch.as_tensor(np.ascontiguousarray(array)).to(device, dtype)


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    """The argument names of a model class's forward (looked up once per class, not per batch)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def to_model_inputs(batch: Batch, device: torch.device, keys=MODEL_INPUTS, model=None) -> dict[str, torch.Tensor]:
    """The batch's model inputs as tensors; with `model`, only those its forward() names.

    A packed batch (`cu_seqlens`) also gets transformers' packing keyword arguments; the model must be
    through models.varlen.enable_varlen, since stock sdpa would ignore them and attend across samples.
    """
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
        accepted = _forward_parameters(type(base))
        keys = {k: v for k, v in keys.items() if k in accepted}
    inputs = {key: to_tensor(batch[key], device, dtype) for key, dtype in keys.items() if key in batch}
    if "cu_seqlens" in batch:  # a packed [1, L] row: transformers forwards these to every text attention call
        from .models.varlen import packed_attention_kwargs, require_varlen

        require_varlen(model)
        inputs.update(packed_attention_kwargs(batch["cu_seqlens"], batch["max_seqlen"], device))
    return inputs
