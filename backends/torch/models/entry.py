"""`TorchModel`: what the torch backend needs to know about a family beyond its spec (core/families).

Each family has one file in this folder, named after its model_type, that defines `ENTRY`. The model
class itself is transformers' (`FamilySpec.architecture`); the entry says how vltune drives it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
