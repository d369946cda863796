"""Circle-RoPE with AGE layer strategies on the stock transformers Qwen VL models.

Circle-RoPE changes only *positions*, never weights: the batch carries Circle-RoPE ids in
`position_ids` (floats) and, when the AGE strategy leaves some layers on plain M-RoPE, the plain ids
in `position_ids_alt`. The stock text model computes one cos/sin from `position_ids` and hands it to
every decoder layer; a forward pre-hook on each M-RoPE layer swaps in the cos/sin of the alt ids.
The model code is not edited, and a checkpoint saved from it loads in stock transformers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vltune.core.circle_rope import age_layer_mask
from vltune.core.families import attention_layer_indices

from . import part


class CircleRopeAdapter:
    """Per-layer rotary embeddings for a transformers Qwen2.5-VL / Qwen3-VL model."""

    def __init__(self, model: torch.nn.Module, circle_rope: dict):
        self.text_model = part(model, "llm")
        self.config = dict(circle_rope)
        # AGE counts the layers with rotary positions: every layer, or a hybrid model's attention layers
        layers = self.text_model.layers
        rotary = [layers[i] for i in attention_layer_indices(getattr(self.text_model.config, "layer_types", None), len(layers))]
        self.layer_mask = age_layer_mask(self.config.get("AGE_mode", "strategy_1"), len(rotary))
        self._alt_ids: torch.Tensor | None = None
        self._alt_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hooks = [
            layer.register_forward_pre_hook(self._use_alt_embeddings, with_kwargs=True)
            for layer, circle in zip(rotary, self.layer_mask)
            if not circle
        ]

    @property
    def needs_alt_positions(self) -> bool:
        return not all(self.layer_mask)

    def _use_alt_embeddings(self, module, args, kwargs):
        if self._alt_ids is None:
            raise RuntimeError(
                "Circle-RoPE with AGE mixes layer kinds, but the batch has no position_ids_alt "
                "(plain M-RoPE ids) for the M-RoPE layers"
            )
        if self._alt_embeddings is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._alt_embeddings = self.text_model.rotary_emb(hidden, self._alt_ids)
        kwargs["position_embeddings"] = self._alt_embeddings
        return args, kwargs

    @contextmanager
    def alt_positions(self, alt_position_ids: torch.Tensor | None):
        """Within this block, M-RoPE layers use the cos/sin of `alt_position_ids` [3, B, L]."""
        self._alt_ids, self._alt_embeddings = alt_position_ids, None
        try:
            yield
        finally:
            self._alt_ids, self._alt_embeddings = None, None

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
