"""Model registry of the MindSpore backend: config.json's `model_type` -> native MindSpore model.

Mirrors backends/torch/models: the class is chosen from the model's own config, never from its path.
Each family with a native model has a file here named after it whose `ENTRY` (entry.py) names the class
and the switches it needs; Qwen2.5-VL and Qwen3-VL share one module tree (qwen_vl.py).
"""

from __future__ import annotations

from pathlib import Path

from ..attention import Kernels, kernels_for
from .config import VLConfig
from .entry import model_entry
from .qwen_vl import ModelInputs, QwenVLForConditionalGeneration
from .text import KVCache



def build_model(cfg: VLConfig, kernels: Kernels | None = None) -> QwenVLForConditionalGeneration:
    """An uninitialised (zero) model for `cfg`, its parameters named with their HF names."""
    model = model_entry(cfg.model_type).cls(cfg, kernels or kernels_for())
    for name, param in model.parameters_and_names():
        param.name = name  # cells assigned after their parent was built keep short names otherwise
    return model


def load_model(model_dir: str | Path, kernels: Kernels | None = None) -> QwenVLForConditionalGeneration:
    """Build the model config.json describes and load its safetensors weights."""
    from ..checkpoint import load_hf_weights

    cfg = VLConfig.from_dir(model_dir)
    model = build_model(cfg, kernels)
    load_hf_weights(model, model_dir)
    return model


__all__ = ["KVCache", "ModelInputs", "QwenVLForConditionalGeneration", "VLConfig", "build_model", "load_model"]
