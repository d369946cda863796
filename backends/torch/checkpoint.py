"""Writing models to disk in HF format, atomically.

Files are written to a temporary directory beside the target and moved into place only when all of
them are complete, so a run killed mid-save never leaves a half-written model that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Files of the source model directory that make a saved model directory complete for inference.
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


CIRCLE_ROPE_FILE = "circle_rope.json"


def save_hf_model(model: torch.nn.Module, source_dir: Path, out_dir: Path, circle_rope: dict | None = None) -> None:
    """Save `model` as an HF-format directory (weights, config, tokenizer, processor configs).

    config.json stays the stock one (so transformers loads the directory); a model trained with
    Circle-RoPE also gets `circle_rope.json`, which `vltune infer` reads to place positions the same way.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in PROCESSOR_FILES:
            if (Path(source_dir) / name).exists():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        if circle_rope:
            (tmp / CIRCLE_ROPE_FILE).write_text(json.dumps(circle_rope, indent=2) + "\n")
        else:
            (out_dir / CIRCLE_ROPE_FILE).unlink(missing_ok=True)  # never leave a stale one behind
        for path in tmp.iterdir():
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
