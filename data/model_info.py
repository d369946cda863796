"""What data/ needs to know about a model directory: its family's `ModelInfo` (core/families reads
config.json), and which files beside the weights make a saved copy complete."""

from __future__ import annotations

from ..core.families import ModelInfo, read_model_info

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

__all__ = ["PROCESSOR_FILES", "ModelInfo", "read_model_info"]
