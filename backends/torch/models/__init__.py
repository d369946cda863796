"""Model registry of the torch backend: config.json's `model_type` -> transformers class.

The class is chosen from the model's own config, never from a substring of its path (the official
scripts do the latter and pick the wrong class for renamed directories).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vltune.data.model_info import read_model_info

MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    adapter: str | Path | None = None,
):
    """Load an HF-format Qwen VL directory with the class its config.json names (plus a PEFT adapter)."""
    import transformers

    info = read_model_info(model_dir)
    cls = getattr(transformers, MODEL_CLASSES[info.model_type])
    model = cls.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn_implementation)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"adapter directory {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter))
    return model


def merge_lora(model_dir: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base weights and save a full HF-format model directory."""
    from ..checkpoint import CIRCLE_ROPE_FILE, save_hf_model

    merged = load_model(model_dir, adapter=adapter).merge_and_unload()
    circle_file = Path(adapter) / CIRCLE_ROPE_FILE
    circle = json.loads(circle_file.read_text()) if circle_file.exists() else None
    save_hf_model(merged, Path(model_dir), Path(out_dir), circle_rope=circle)
    return Path(out_dir)
