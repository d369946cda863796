"""Model registry of the torch backend: a family (core/families) -> transformers class + `TorchModel` entry.

The class is the one config.json's `model_type` names through its family spec, never a guess from
the model directory's path (the official scripts do the latter and pick the wrong class for renamed
directories). Each family has a file here named after it that defines `ENTRY`.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from vltune.core.families import FamilySpec, get_family, read_model_info

from .entry import TorchModel, model_entry


def model_class(spec: FamilySpec):
    import transformers

    return getattr(transformers, spec.architecture)


def part(model: torch.nn.Module, role: str) -> torch.nn.Module:
    """The module playing `role` of the family's module map ("vision_tower", "decoder_layers", "llm",
    ...) in a plain or peft-wrapped transformers model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule(getattr(get_family(base.config.model_type).modules, role))


def swap_forward(modules: list[torch.nn.Module], forward) -> int:
    """Make `forward` (a function taking the module first) the `forward` of each of `modules`, leaving
    their class and weights alone; idempotent; returns how many modules there are."""
    for module in modules:
        if not has_forward(module, forward):
            module.forward = types.MethodType(forward, module)
    return len(modules)


def has_forward(module: torch.nn.Module, forward) -> bool:
    return getattr(module.forward, "__func__", None) is forward


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    adapter: str | Path | None = None,
):
    """Load an HF-format model directory with the class its config.json's family names (plus a PEFT adapter)."""
    info = read_model_info(model_dir)
    cls = model_class(info.family)
    model = cls.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn_implementation)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"adapter directory {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter))
    return model


def merge_lora(model_dir: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base weights and save a full HF-format directory."""
    from ..checkpoint import CIRCLE_ROPE_FILE, save_hf_model

    merged = load_model(model_dir, adapter=adapter).merge_and_unload()
    circle_file = Path(adapter) / CIRCLE_ROPE_FILE
    circle = json.loads(circle_file.read_text()) if circle_file.exists() else None
    save_hf_model(merged, Path(model_dir), Path(out_dir), circle_rope=circle)
    return Path(out_dir)


__all__ = ["TorchModel", "has_forward", "load_model", "merge_lora", "model_class", "model_entry", "part", "swap_forward"]
