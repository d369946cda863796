"""Writing models to disk in HF format, atomically.

Files are written to a temporary directory beside the target and moved into place only when all of
them are complete, so a run killed mid-save never leaves a half-written model that looks whole.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from vltune.core.checkpointing import write_atomically
from vltune.core.families import get_family
from vltune.core.untrained_weights import carry_untrained
from vltune.data.model_info import PROCESSOR_FILES

CIRCLE_ROPE_FILE = "circle_rope.json"


def save_hf_model(
    model: torch.nn.Module, source_dir: Path, out_dir: Path, circle_rope: dict | None = None, state_dict: dict | None = None
) -> None:
    """Save `model` as an HF-format directory (weights, config, tokenizer, processor configs).

    config.json stays the stock one (so transformers loads the directory); a model trained with
    Circle-RoPE also gets `circle_rope.json`, which `vltune infer` reads to place positions the same way.
    `state_dict`: full weights gathered by a sharding engine (ZeRO-3, FSDP2), whose live module holds shards.
    Tensors of the source that the model does not load (the family's `untrained_prefixes`) are copied over.
    """
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        carry_untrained(source_dir, tmp, get_family(model.config.model_type).untrained_prefixes)  # Qwen3.5's mtp.*
        for name in PROCESSOR_FILES:
            if (Path(source_dir) / name).exists():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        if circle_rope:
            (tmp / CIRCLE_ROPE_FILE).write_text(json.dumps(circle_rope, indent=2) + "\n")
        else:
            (out_dir / CIRCLE_ROPE_FILE).unlink(missing_ok=True)  # never leave a stale one behind

    write_atomically(out_dir, write)


OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"


def rng_state() -> dict:
    """Every random stream a step can touch (dropout, sampling), to resume bit for bit."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: torch.nn.Module, directory: Path, lora: bool) -> None:
    """Load the weights a checkpoint saved back into the live model (full model or PEFT adapter)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise ValueError(f"{directory}: adapter has keys the model lacks: {result.unexpected_keys[:5]}")
        return
    model.load_state_dict(saved_state(model, directory, next(model.parameters()).dtype))


def saved_state(model: torch.nn.Module, directory: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full model a checkpoint saved, as `model`'s state_dict in `dtype`.

    The saved names are the checkpoint's (transformers renames on save and load), so they are read back
    through transformers itself: exact, and independent of the naming scheme."""
    # (resolve_resume has checked every file of the checkpoint: a truncated one is named there)
    if not any(Path(directory).glob("model*.safetensors")):
        raise FileNotFoundError(f"{directory}: no model*.safetensors to resume from")
    return type(model).from_pretrained(str(directory), dtype=dtype).state_dict()
