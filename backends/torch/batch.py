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
    "position_ids": torch.long,
    "pixel_values": torch.float32,
    "image_grid_thw": torch.long,
}


def to_model_inputs(batch: Batch, device: torch.device, keys=MODEL_INPUTS) -> dict[str, torch.Tensor]:
    return {
        key: torch.as_tensor(np.ascontiguousarray(batch[key])).to(device, dtype)
        for key, dtype in keys.items()
        if key in batch
    }
