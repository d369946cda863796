"""HF-format weights <-> the MindSpore models, optimizer and RNG state: everything the backend writes.

Names: the native models use transformers 5's module names, so the only renames are between the
two layouts HF checkpoints come in, kept in the one table `LEGACY_RENAMES`:
  transformers 5 layout   `model.language_model.*`, `model.visual.*`, `lm_head.*` (Qwen3-VL releases)
  legacy layout           `model.layers|embed_tokens|norm.*`, `visual.*`, `lm_head.*` (Qwen2/2.5-VL releases)
Both are read; a model is saved in the layout its source directory had (which is also what
transformers' own save_pretrained does: it reverts the renames it applied on load). A family whose
checkpoints have a layout of their own (Ovis2.5's original one) carries its table on the model class as
`hf_names` (`to_native` on load, `to_hf` per tensor on save), beside its cells in models/.

Files: safetensors read and written here directly (header + raw little-endian buffers), because
numpy has no bfloat16: bf16 tensors are widened to fp32 exactly on load and narrowed back (round to
nearest even, exact for values that came from bf16) on save.

Directories are written into a temporary directory and moved into place file by file once all are
complete, as backends/torch/checkpoint.py does.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from vltune.core.checkpointing import require_whole, write_atomically
from vltune.core.families import get_family
from vltune.core.safetensors_files import weight_files
from vltune.core.untrained_weights import carry_untrained
from vltune.data.model_info import PROCESSOR_FILES as MODEL_DIR_FILES

# HF legacy-layout name -> native (transformers 5) name.
LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^visual\.", "model.visual."),
)
# native -> legacy, the inverse of the table above.
LEGACY_SAVES: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.", "model."),
    (r"^model\.visual\.", "visual."),
)

# generation_config.json too: transformers' save_pretrained writes it on the torch side, here nobody does.
PROCESSOR_FILES = MODEL_DIR_FILES + ("generation_config.json",)
CIRCLE_ROPE_FILE = "circle_rope.json"
WEIGHTS_FILE = "model.safetensors"

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# -- safetensors files -------------------------------------------------------------------------------


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, their file dtypes) of one safetensors file; BF16 comes back as exact fp32."""
    require_whole(path)  # a truncated file names itself, instead of failing inside a reshape
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    tensors, dtypes = {}, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        raw = data[start:end]
        if spec["dtype"] == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif spec["dtype"] in _DTYPES:
            array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")).copy()
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {spec['dtype']}, which vltune cannot read")
        tensors[name] = array.reshape(spec["shape"])
        dtypes[name] = spec["dtype"]
    return tensors, dtypes


def _to_bf16_bits(array: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF  # round to nearest, ties to even
    return ((bits + rounding) >> 16).astype("<u2")


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> None:
    """Write `tensors` (numpy) as one safetensors file; `dtypes` may ask for "BF16" per tensor."""
    dtypes = dtypes or {}
    header, buffers, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if dtypes.get(name) == "BF16":
            raw, dtype = _to_bf16_bits(array).tobytes(), "BF16"
        else:
            array = np.ascontiguousarray(array)
            raw, dtype = array.astype(array.dtype.newbyteorder("<")).tobytes(), _NAMES[array.dtype]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        buffers.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for raw in buffers:
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


# -- HF directories ----------------------------------------------------------------------------------


def hf_weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF directory (sharded through its index, or model*.safetensors)."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model*.safetensors (expected an HF-format model directory)")
    return files


def hf_to_native(name: str) -> str:
    for pattern, repl in LEGACY_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def native_to_hf(name: str, layout: str) -> str:
    if layout == "legacy":
        for pattern, repl in LEGACY_SAVES:
            name = re.sub(pattern, repl, name)
    return name


def detect_layout(names) -> str:
    """legacy | transformers5, from a checkpoint's tensor names."""
    return "legacy" if any(re.match(p, n) for n in names for p, _ in LEGACY_RENAMES) else "transformers5"


def read_hf_weights(model_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(native name -> array, native name -> file dtype, layout) of an HF directory."""
    tensors, dtypes = {}, {}
    for path in hf_weight_files(model_dir):
        t, d = read_safetensors(path)
        tensors.update(t)
        dtypes.update(d)
    layout = detect_layout(tensors)
    return ({hf_to_native(k): v for k, v in tensors.items()}, {hf_to_native(k): v for k, v in dtypes.items()}, layout)


def load_hf_weights(model: nn.Cell, model_dir: str | Path) -> None:
    """Copy an HF directory's weights into `model`; every parameter must be covered, nothing left over.

    Records the file layout and dtypes on the model (`hf_layout`, `hf_dtypes`) so save_hf_model
    writes the same layout back.
    """
    tensors, dtypes, layout = read_hf_weights(model_dir)
    family_names = getattr(model, "hf_names", None)
    if family_names is not None:
        tensors, dtypes, layout = family_names.to_native(tensors, dtypes, layout)
    untrained = _untrained_prefixes(model)
    tensors = {k: v for k, v in tensors.items() if not (untrained and k.startswith(untrained))}  # as transformers skips them
    params = dict(model.parameters_and_names())
    if getattr(model, "tied", False):
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head too; the embedding is it
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        array = tensors[name]
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{model_dir}: {name} has shape {array.shape} in the file, {tuple(param.shape)} in the model")
        param.set_data(ms.Tensor(array.astype(np.float32)).astype(param.dtype))
    model.hf_layout, model.hf_dtypes = layout, dtypes


def _untrained_prefixes(model: nn.Cell) -> tuple[str, ...]:
    """Checkpoint tensors the family's model does not load (Qwen3.5's `mtp.*`); save carries them over."""
    cfg = getattr(model, "cfg", None)
    return get_family(cfg.model_type).untrained_prefixes if cfg is not None else ()


def parameter_arrays(model: nn.Cell, names=None) -> dict[str, np.ndarray]:
    """fp32 numpy copies of the model's parameters (all, or those in `names`)."""
    return {
        name: param.astype(ms.float32).asnumpy() if param.dtype != ms.float32 else param.asnumpy()
        for name, param in model.parameters_and_names()
        if names is None or name in names
    }


def _copy_processor_files(source_dir: Path, target: Path) -> None:
    for name in PROCESSOR_FILES:
        if (Path(source_dir) / name).exists():
            shutil.copy2(Path(source_dir) / name, target / name)


def save_hf_model(model: nn.Cell, source_dir: str | Path, out_dir: str | Path, circle_rope: dict | None = None) -> None:
    """Save `model` as an HF-format directory that transformers loads: config.json (the source's),
    model.safetensors in the source's layout and dtypes, tokenizer and processor files, and
    circle_rope.json for a model trained with Circle-RoPE."""
    layout = getattr(model, "hf_layout", "transformers5")
    file_dtypes = getattr(model, "hf_dtypes", {})
    arrays = parameter_arrays(model)
    tensors = {native_to_hf(k, layout): v for k, v in arrays.items()}
    dtypes = {native_to_hf(k, layout): file_dtypes.get(k) for k in arrays}
    family_names = getattr(model, "hf_names", None)
    if family_names is not None:
        renamed = {k: family_names.to_hf(k, v, layout) for k, v in arrays.items()}
        tensors = dict(renamed.values())
        dtypes = {renamed[k][0]: file_dtypes.get(k) for k in arrays}

    def write(tmp: Path) -> None:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, dtypes)
        carry_untrained(source_dir, tmp, _untrained_prefixes(model))  # Qwen3.5's mtp.*, bytes unchanged
        shutil.copy2(Path(source_dir) / "config.json", tmp / "config.json")
        _copy_processor_files(Path(source_dir), tmp)
        if circle_rope:
            (tmp / CIRCLE_ROPE_FILE).write_text(json.dumps(circle_rope, indent=2) + "\n")

    if not circle_rope:
        (Path(out_dir) / CIRCLE_ROPE_FILE).unlink(missing_ok=True)  # never leave a stale one behind
    write_atomically(Path(out_dir), write)


# -- optimizer and RNG --------------------------------------------------------------------------------

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.json"


def rng_state() -> dict:
    """numpy's, python's and MindSpore's random streams, JSON-serialisable."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_py = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), gauss_py],
        "mindspore_seed": int(ms.get_seed()) if ms.get_seed() is not None else None,
    }


def set_rng_state(state: dict) -> None:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, gauss_py = state["python"]
    random.setstate((version, tuple(py_state), gauss_py))
    if state.get("mindspore_seed") is not None:
        ms.set_seed(state["mindspore_seed"])
