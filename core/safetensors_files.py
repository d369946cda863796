"""The safetensors files of an HF-format directory, read without a framework: which files hold the
weights, each file's header, and whether a file is whole. One reader for the checkpoint checks
(core/checkpointing.py), the torch loader's weight check, MindSpore's reader and the carrier of
untrained tensors (core/untrained_weights.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .config import ConfigError

INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: str | Path) -> list[Path]:
    """The files the index lists (some may be missing: the caller says so), else model*.safetensors;
    empty when there is neither."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if not index.exists():
        return sorted(model_dir.glob("model*.safetensors"))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); copy or download it again") from None
    return [model_dir / name for name in names]


def read_header(path: str | Path) -> tuple[dict, int]:
    """(the header: tensor name -> dtype, shape, data_offsets; the byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file's layout, phrased to follow its path ("is truncated (...)"),
    from its header alone: 8-byte header size, JSON header, tensor data ending exactly at the end of the
    file (a download or copy cut short loses the end); None when it is whole."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes: no header)"
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            return f"is truncated ({size} bytes, its header alone claims {header_size})"
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:
            return f"is corrupt (its header is not valid JSON: {e})"
    end = max((spec["data_offsets"][1] for name, spec in header.items() if name != "__metadata__"), default=0)
    if 8 + header_size + end != size:
        return f"is truncated ({size} bytes where its header describes {8 + header_size + end})"
    return None
