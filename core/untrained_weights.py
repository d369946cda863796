"""Checkpoint tensors a model does not load, carried from its source directory into a saved one unchanged.

Qwen3.5's checkpoints hold a multi-token-prediction head (`mtp.*`) that transformers skips on load: a
fine-tuned model saved from the live module would lose it, and with it the speculative decoding that
serving engines run from it. `carry_untrained` copies those tensors' bytes straight out of the source's
safetensors files (any dtype, bf16 included, bit for bit; no framework involved) into one more file of
the saved directory, and lists them in its shard index when it has one.

The safetensors layout: an 8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and [begin, end) byte offsets into the data that follows, then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .safetensors_files import INDEX_FILE, read_header, weight_files

CARRIED_FILE = "model-untrained.safetensors"


def untrained_names(model_dir: str | Path, prefixes: tuple[str, ...]) -> list[str]:
    """The tensor names in `model_dir`'s safetensors files that start with one of `prefixes`."""
    if not prefixes:
        return []
    found = []
    for path in weight_files(model_dir):
        header, _ = read_header(path)
        found += [name for name in header if name != "__metadata__" and name.startswith(prefixes)]
    return sorted(found)


def carry_untrained(source_dir: str | Path, out_dir: str | Path, prefixes: tuple[str, ...]) -> list[str]:
    """Copy the tensors named with `prefixes` from `source_dir`'s weights into `out_dir/CARRIED_FILE`;
    returns their names (none copied, no file written, when the source has none)."""
    out_dir = Path(out_dir)
    already = set(untrained_names(out_dir, prefixes))
    entries: dict[str, dict] = {}
    chunks: list[bytes] = []
    offset = 0
    for path in weight_files(source_dir):
        header, data_start = read_header(path)
        names = sorted(n for n in header if n != "__metadata__" and n.startswith(prefixes) and n not in already)
        if not names:
            continue
        with open(path, "rb") as f:
            for name in names:
                begin, end = header[name]["data_offsets"]
                f.seek(data_start + begin)
                chunks.append(f.read(end - begin))
                entries[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                                 "data_offsets": [offset, offset + end - begin]}
                offset += end - begin
    if not entries:
        return []
    header_bytes = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(out_dir / CARRIED_FILE, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for chunk in chunks:
            f.write(chunk)
    index = out_dir / INDEX_FILE
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"].update({name: CARRIED_FILE for name in entries})
        index.write_text(json.dumps(content, indent=2) + "\n")
    return sorted(entries)
