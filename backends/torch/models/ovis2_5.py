"""Ovis2.5 on torch: transformers' Ovis2_5ForConditionalGeneration. The tower's grid-derived inputs
(rotary ids, attention segments, window order, position-grid interpolation) are computed on the host;
its features go to the stock forward (`mm_encoder_outputs`), which places them and the indicator
embeddings of the start/end tokens. Packed rows reach its Qwen3 attention through the varlen attention
implementation, and its tower's attention through the varlen vision forward."""

import torch

from .entry import TorchModel


def _dummy_encode(inner: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """One image-encoding call as the stock forward makes it before embedding the tokens: the tower,
    then the projector (visual tokenizer, visual embedding table) on its last layer's output."""
    return list(inner.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=True).pooler_output)


def _dummy_encode_late(inner: torch.nn.Module, device: torch.device) -> list[torch.Tensor]:
    """What the stock forward's merge looks up per encoding call after the token embedding: the indicators."""
    return [inner.multi_modal_projector.get_visual_indicator_features(device)]


ENTRY = TorchModel(vision_inputs=("windows", "interpolation"), features_to_forward=True,
                   dummy_encode=_dummy_encode, dummy_encode_late=_dummy_encode_late)
