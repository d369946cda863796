"""Model registry of the torch backend: config.json's `model_type` -> transformers class.

The class is chosen from the model's own config, never from a substring of its path (the official
scripts do the latter and pick the wrong class for renamed directories).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vltune.data.model_info import read_model_info

MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load an HF-format Qwen VL directory with the class its config.json names."""
    import transformers

    info = read_model_info(model_dir)
    cls = getattr(transformers, MODEL_CLASSES[info.model_type])
    return cls.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn_implementation)
