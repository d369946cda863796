"""numpy batch (core.contracts.Batch) -> the tensors a transformers Qwen VL forward takes."""

from __future__ import annotations

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
}


def to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.long and np.issubdtype(array.dtype, np.floating):
        dtype = torch.float32  # Circle-RoPE positions are fractional
    return torch.as_tensor(np.ascontiguousarray(array)).to(device, dtype)


def to_model_inputs(batch: Batch, device: torch.device, keys=MODEL_INPUTS) -> dict[str, torch.Tensor]:
    return {key: to_tensor(batch[key], device, dtype) for key, dtype in keys.items() if key in batch}
