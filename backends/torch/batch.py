"""numpy batch (core.contracts.Batch) -> the tensors a transformers Qwen VL forward takes."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from vltune.core.contracts import Batch
from vltune.core.families import get_family

from .attention import require_varlen

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
    """The array on `device`. To a GPU through pinned memory, asynchronously: a copy from pageable memory
    holds the host until the GPU has run everything queued before it (a 47 MB image row costs the GPU
    its queue), so the next row's kernels could not be launched ahead."""
    if dtype == torch.long and np.issubdtype(array.dtype, np.floating):
        dtype = torch.float32  # Circle-RoPE positions are fractional
    return send(torch.as_tensor(np.ascontiguousarray(array)), device, dtype)


def send(host: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory without waiting (see to_tensor)."""
    if torch.device(device).type in ("cuda", "npu"):
        return host.pin_memory().to(device, dtype, non_blocking=True)
    return host.to(device, dtype)


PIN_MIN_BYTES = 1 << 16


def pin_batch(batch: Batch) -> Batch:
    """The batch with its numeric arrays of PIN_MIN_BYTES or more copied into page-locked (pinned) host
    memory, still as numpy arrays (views of pinned tensors, which they keep alive).

    Runs on the data loader's thread (data/prefetch.py), so the copy into pinned memory, 5-10 ms for a
    47 MB image row, is not the training thread's: when `send` later meets the pinned array it issues
    the asynchronous copy to the GPU directly (`Tensor.pin_memory` returns an already pinned tensor as it is).
    Small arrays are left to `send`: each call here gives up and takes back the GIL, and the thread
    then waits for the training thread to let go of it (up to its switch interval, 5 ms).

    Each array is a view of its whole pinned tensor, starting at its first byte: the non-blocking copy
    finds the pinned block by that pointer and records its event there, so the block is not handed out
    again while the copy is in flight."""
    pinned = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.nbytes >= PIN_MIN_BYTES:
            value = torch.as_tensor(np.ascontiguousarray(value)).pin_memory().numpy()
        pinned[key] = value
    return pinned


def vision_tower_kwargs(visual: torch.nn.Module, parts: tuple[str, ...], grid_thw: torch.Tensor, device: torch.device) -> dict:
    """The vision tower's grid-derived inputs, computed on the host from a CPU `grid_thw` with
    transformers' own `vision_utils` helpers, then sent to `device`: rotary position ids, the attention
    segments and their longest, Qwen2.5-VL's window order, Qwen3-VL's position-embedding interpolation.

    The tower pops these from its kwargs instead of deriving them from a grid on the GPU, which reads
    the grid back a dozen times per forward (each a device sync that drains the launch queue).
    `parts` are the family's extras (backends/torch/models entry `vision_inputs`): "windows", "interpolation"."""
    from transformers import vision_utils as vu

    merge = visual.spatial_merge_size
    out: dict = {"position_ids": vu.get_vision_position_ids(grid_thw, merge), "cu_seqlens": vu.get_vision_cu_seqlens(grid_thw)}
    out["max_seqlen"] = _longest(out["cu_seqlens"])
    if "windows" in parts:
        out["window_index"], out["cu_window_seqlens"] = vu.get_vision_window_index(
            grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
        )
        out["max_window_seqlen"] = _longest(out["cu_window_seqlens"])
    if "interpolation" in parts:
        grid = getattr(visual, "embeddings", visual)  # where the position grid lives (Ovis2.5: the embeddings)
        out["interp_indices"], out["interp_weights"] = vu.get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=grid.num_grid_per_side, mode=grid.interpolation_mode,
            align_corners=grid.interpolation_align_corners, spatial_merge_size=merge,
        )
    return {key: send(value, device) if isinstance(value, torch.Tensor) else value for key, value in out.items()}


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    """The argument names of a model class's forward (looked up once per class, not per batch)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """transformers 5.x's `mm_token_type_ids` (0 text, 1 image, 2 video token), from which the stock
    model builds its own M-RoPE ids when it is given no position ids."""
    return (input_ids == image_token_id).int() + 2 * (input_ids == video_token_id).int()


def packed_attention_kwargs(cu_seqlens: np.ndarray, max_seqlen: int | np.ndarray, device: torch.device) -> dict:
    """The keyword arguments that make the text attention treat a [1, L] row as packed sub-sequences."""
    cu = send(torch.as_tensor(np.asarray(cu_seqlens, dtype=np.int32)), device)  # pinned, non-blocking
    longest = int(max_seqlen)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def to_model_inputs(batch: Batch, device: torch.device, keys=MODEL_INPUTS, model=None) -> dict[str, torch.Tensor]:
    """The batch's model inputs as tensors; with `model`, only those its forward() names.

    A packed batch (`cu_seqlens`) also gets transformers' packing keyword arguments; the model must be
    through attention.enable_varlen, since stock sdpa would ignore them and attend across samples.
    """
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
        accepted = _forward_parameters(type(base))
        keys = {k: v for k, v in keys.items() if k in accepted}
        if "position_ids" in batch and get_family(base.config.model_type).position.rotary == "text":
            batch = {**batch, "position_ids": batch["position_ids"][0]}  # 1-D positions: the rows are equal
    inputs = {key: to_tensor(batch[key], device, dtype) for key, dtype in keys.items() if key in batch}
    if "cu_seqlens" in batch:  # a packed [1, L] row: transformers forwards these to every text attention call
        require_varlen(model)
        inputs.update(packed_attention_kwargs(batch["cu_seqlens"], batch["max_seqlen"], device))
    return inputs
