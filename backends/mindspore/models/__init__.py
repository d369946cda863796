"""Model registry of the MindSpore backend: config.json's `model_type` -> native MindSpore model.

Mirrors backends/torch/models: the class is chosen from the model's own config, never from its path.
Qwen2.5-VL and Qwen3-VL share one module tree (the differences are config switches), so the registry
maps both onto `QwenVLForConditionalGeneration`; Qwen2-VL has no MindSpore model yet.
"""

from __future__ import annotations

from pathlib import Path

from ..attention import Kernels, kernels_for
from .config import SUPPORTED_MODEL_TYPES, VLConfig
from .qwen_vl import ModelInputs, QwenVLForConditionalGeneration
from .text import KVCache

MODEL_CLASSES = {model_type: QwenVLForConditionalGeneration for model_type in SUPPORTED_MODEL_TYPES}


def build_model(cfg: VLConfig, kernels: Kernels | None = None) -> QwenVLForConditionalGeneration:
    """An uninitialised (zero) model for `cfg`, its parameters named with their HF names."""
    model = MODEL_CLASSES[cfg.model_type](cfg, kernels or kernels_for())
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


__all__ = ["MODEL_CLASSES", "KVCache", "ModelInputs", "QwenVLForConditionalGeneration", "VLConfig", "build_model", "load_model"]
