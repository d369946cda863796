"""What data/ needs to know about a model directory, read from its JSON files (no framework needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Files of a model directory besides config and weights that make a saved copy complete for inference
# (tokenizer, chat template, processor configs); both backends copy them beside what they save.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    """qwen2_vl | qwen2_5_vl | qwen3_vl, from config.json (never guessed from the path)."""
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int
    tokens_per_second: float
    num_hidden_layers: int
    """Decoder layers of the language model (AGE strategies pick Circle-RoPE layers by index)."""


def read_model_info(model_dir: str | Path) -> ModelInfo:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json (is this an HF-format model directory?)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    vision = config.get("vision_config", {})
    text = config.get("text_config", config)
    return ModelInfo(
        model_type=model_type,
        image_token_id=config["image_token_id"],
        video_token_id=config["video_token_id"],
        vision_start_token_id=config["vision_start_token_id"],
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        tokens_per_second=vision.get("tokens_per_second", 2),
        num_hidden_layers=text["num_hidden_layers"],
    )
