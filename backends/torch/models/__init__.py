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
    check_weight_files(model_dir)
    cls = model_class(info.family)
    model = cls.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn_implementation)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"adapter directory {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter))
    return model


def check_weight_files(model_dir: str | Path) -> None:
    """Raise, naming the file, when a model directory's weights are missing or a safetensors file is cut short
    (an interrupted download or copy); transformers' own errors name neither the file nor the fix."""
    from vltune.core.config import ConfigError
    from vltune.core.safetensors_files import safetensors_problem, weight_files

    root = Path(model_dir)
    files = weight_files(root)
    if not files:
        if list(root.glob("pytorch_model*.bin")):
            return  # torch pickles: transformers reads and checks them
        files = [root / "model.safetensors"]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the model directory {root} has no weights there "
                                    "(copy or download the model's weight files into it)")
        problem = safetensors_problem(path)
        if problem:
            raise ConfigError(f"{path} {problem}: an interrupted download or copy? Copy or download it again")


def merge_lora(model_dir: str | Path, adapter: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base weights and save a full HF-format directory (`vltune merge-lora`).

    An existing, non-empty `out_dir` is refused unless `overwrite` (merging replaces its weights, as a
    model directory given by mistake would lose them); the base model's or the adapter's own directory always is."""
    from ..checkpoint import CIRCLE_ROPE_FILE, save_hf_model

    out = Path(out_dir)
    for role, source in (("base model", model_dir), ("adapter", adapter)):
        if out.resolve() == Path(source).resolve():
            raise FileExistsError(f"--out {out} is the {role}'s own directory: merging would replace its files; "
                                  "choose a new directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} already exists and is not empty (a model directory?): merging would replace "
                              "its weights; choose a new directory, or pass --overwrite")
    merged = load_model(model_dir, adapter=adapter).merge_and_unload()
    circle_file = Path(adapter) / CIRCLE_ROPE_FILE
    circle = json.loads(circle_file.read_text()) if circle_file.exists() else None
    save_hf_model(merged, Path(model_dir), Path(out_dir), circle_rope=circle)
    return Path(out_dir)


__all__ = ["TorchModel", "check_weight_files", "has_forward", "load_model", "merge_lora", "model_class", "model_entry", "part", "swap_forward"]
