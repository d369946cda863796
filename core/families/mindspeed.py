"""The vocabulary of an HF <-> MindSpeed-MM name table (`FamilySpec.mindspeed_rules`): how HF tensors are
fused into one MindSpeed-MM tensor, how it is split over tensor-parallel ranks, and which part of the
model (so which pipeline stage) it belongs to. backends/torch/convert applies a family's table."""

from __future__ import annotations

from dataclasses import dataclass

# How HF tensors become one MindSpeed-MM tensor.
RENAME, QKV_VISION, QKV_TEXT, GATE_UP, TIED_COPY = "rename", "qkv_vision", "qkv_text", "gate_up", "tied_copy"
# How a MindSpeed-MM tensor is split over tensor-parallel ranks: dim 0, dim 1, gate and up separately, or copied.
ROW, COL, GLU, REPLICATE = "row", "col", "glu", "replicate"
# Which part of the model a tensor belongs to; decides its pipeline stage.
VISION_FIRST, VISION_LAYER, VISION_LAST = "vision_first", "vision_layer", "vision_last"
TEXT_FIRST, TEXT_LAYER, TEXT_LAST = "text_first", "text_layer", "text_last"


@dataclass(frozen=True)
class TensorRule:
    """One MindSpeed-MM tensor: the HF tensors it is made of (fused in this order) and how it is split."""

    hf: tuple[str, ...]
    mm: str
    scope: str
    fuse: str = RENAME
    tp: str = REPLICATE


OUTPUT_LAYER = "text_decoder.output_layer.weight"
EMBEDDING = "text_decoder.embedding.word_embeddings.weight"
