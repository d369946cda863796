"""`TorchModel`: what the torch backend needs to know about a family beyond its spec (core/families).

Each family has one file in this folder, named after its model_type, that defines `ENTRY`. The model
class itself is transformers' (`FamilySpec.architecture`); the entry says how vltune drives it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from vltune.core.families import get_family


@dataclass(frozen=True)
class TorchModel:
    vision_inputs: tuple[str, ...] | None = ()
    """The vision tower's grid-derived inputs vltune computes on the host (backends/torch/batch.py
    `vision_tower_kwargs`) beyond the rotary ids and attention segments all towers take: "windows"
    (Qwen2.5-VL's window order), "interpolation" (Qwen3-VL's position-grid interpolation). None: a tower
    vltune does not precompute for; transformers' forward runs it."""
    features_to_forward: bool = False
    """The tower's outputs go to the stock forward as `mm_encoder_outputs` (Qwen3-VL: DeepStack features
    feed early decoder layers) instead of being placed into the input embeddings here."""
    dummy_encode: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], list[torch.Tensor]] | None = None
    """For a data-parallel rank without images (backends/torch/distributed.py VisionSync): what one
    image-encoding call of a stock forward that encodes *before* embedding the tokens runs, (the inner
    VL model, pixels, grid) -> the tensors it uses; VisionSync runs it where the real calls happen, at
    the start of the inner model's forward. None: the Qwen order (tokens embedded first, then the tower
    with its merger inside, run in the language model's pre-hook)."""
    dummy_encode_late: Callable[[torch.nn.Module, torch.device], list[torch.Tensor]] | None = None
    """With `dummy_encode`: what the stock forward runs per encoding call after embedding the tokens
    (Ovis2.5: the indicator embeddings of the start / end tokens), in the language model's pre-hook."""


def model_entry(model_type: str) -> TorchModel:
    """The torch entry of a family; an error naming the family if this backend has none."""
    spec = get_family(model_type)
    try:
        module = importlib.import_module(f"{__package__}.{spec.name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.{spec.name}":
            raise
        raise ValueError(f"model_type {spec.name!r} has no torch model entry (backends/torch/models/{spec.name}.py)") from None
    return module.ENTRY
