"""HF <-> MindSpeed-MM checkpoints of Qwen2.5-VL, with tensor- and pipeline-parallel splits.

The MindSpeed-MM side (REFERENCE.md s6) is a Megatron "release" checkpoint:

    OUT/latest_checkpointed_iteration.txt            "release"
    OUT/release/mp_rank_{tp:02d}/model_optim_rng.pt          one pipeline stage
    OUT/release/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  several pipeline stages

each file `{"model": state_dict, "checkpoint_version": 3.0}`, or with a virtual pipeline of V chunks
`{"model0": ..., "model{V-1}": ..., "checkpoint_version": 3.0}` where pipeline rank r's chunk c is
stage c * pp + r in pipeline order. Inside a stage the vision tower comes first (patch embedding on the
first stage with vision layers, projector on the last), then the language model (word embeddings on
the first stage with text layers, final norm and output layer on the last); layer indices restart at 0
on every stage. Tensors are renamed, q/k/v fused (see `layout.py` for the tables and row orders) and
split over tensor-parallel ranks: by rows (column-parallel layers), by columns (row-parallel layers,
whose biases are copied) or gate and up separately (the fused GLU `linear_fc1`).

Decisions beyond REFERENCE.md, all following MindSpeed-MM's own converter:
* the vision tower's fused `qkv` is also regrouped per head ([q_h, k_h, v_h, ...]) so that a row
  split gives each rank whole heads, and its GLU MLP is fused and split like the language model's;
* a tied head (`tie_word_embeddings`) gets a copy of the embedding as `output_layer` on the last text
  stage when that is not the embedding's stage; `mindspeed-to-hf` checks the copy still equals the
  embedding rather than dropping a trained difference silently;
* `mindspeed-to-hf` needs no layer lists: it reads tp, pp and vpp from the directory names and file
  keys and each stage's layer counts from its tensor names, then checks them against config.json.
Conversions are exact: no dtype casts, only reordering, concatenation and slicing.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from vltune.core.families import read_config as read_family_config
from vltune.core.families.mindspeed import COL, EMBEDDING, GATE_UP, GLU, QKV_TEXT, QKV_VISION, REPLICATE, ROW, TIED_COPY

from .layout import (
    ConvertError, ModelDims, PipelineLayout, PlannedTensor, canonical_hf_name, glu_split_order,
    plan_tensors, text_qkv_order, vision_qkv_order,
)

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"
LATEST_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
INDEX_FILE = "model.safetensors.index.json"

StageDicts = list[list[dict[str, torch.Tensor]]]
"""state dicts indexed [tp_rank][stage]."""


# ------------------------------------------------------------------------------------- HF files


def read_config(hf_dir: Path) -> dict:
    """config.json through the family registry's one reader, its errors as the converter's."""
    try:
        return read_family_config(hf_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConvertError(f"{e}; give an HF-format model directory") from None


def load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's *.safetensors files, under the released checkpoints' names."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{hf_dir}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            canonical = canonical_hf_name(name)
            if canonical in weights:
                raise ConvertError(f"{file}: {name} duplicates {canonical} of another file")
            weights[canonical] = tensor
    return weights


def _check_hf_names(weights: dict[str, torch.Tensor], plan: list[PlannedTensor], hf_dir: Path) -> None:
    """Every tensor the model needs is there, and nothing would be left behind."""
    needed = {name for t in plan for name in t.hf}
    tied_head = weights.get("lm_head.weight")
    if tied_head is not None and "lm_head.weight" not in needed:
        # A tied checkpoint that still stores the head: lossless to drop only if it is the embedding.
        if not torch.equal(tied_head, weights["model.embed_tokens.weight"]):
            raise ConvertError(f"{hf_dir}: config.json ties the embeddings but lm_head.weight differs from them")
        needed.add("lm_head.weight")
    missing, extra = sorted(needed - weights.keys()), sorted(weights.keys() - needed)
    if missing or extra:
        raise ConvertError(f"{hf_dir}: tensors do not match config.json: "
                           f"missing {_few(missing)}; unexpected {_few(extra)}")


def _few(names: list[str], k: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def save_hf_weights(weights: dict[str, torch.Tensor], config_dir: Path, out: Path) -> None:
    """Write safetensors, sharded like `config_dir`'s index when it names exactly these tensors."""
    index_path = Path(config_dir) / INDEX_FILE
    shards = {"model.safetensors": weights}
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        if set(weight_map) == set(weights):
            shards = {}
            for name, tensor in weights.items():
                shards.setdefault(weight_map[name], {})[name] = tensor
            total = sum(t.numel() * t.element_size() for t in weights.values())
            index = {"metadata": {"total_size": total}, "weight_map": {n: weight_map[n] for n in sorted(weights)}}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for file, tensors in shards.items():
        save_file({n: _owning(t) for n, t in tensors.items()}, str(out / file), metadata={"format": "pt"})


def _owning(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy when it is a view into a larger buffer (Megatron saves views of its flat
    parameter buffer), which safetensors refuses to write."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def copy_model_files(config_dir: Path, out: Path) -> None:
    """config.json, tokenizer and processor files: everything at the top level but the weights."""
    for item in sorted(Path(config_dir).iterdir()):
        if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_FILE:
            shutil.copy2(item, out / item.name)


# ------------------------------------------------------------------------------ fuse and split


class _Orders:
    """Index tensors of the q/k/v interleaves, built once per model."""

    def __init__(self, dims: ModelDims) -> None:
        self.dims = dims
        self.forward = {QKV_TEXT: torch.from_numpy(text_qkv_order(dims)),
                        QKV_VISION: torch.from_numpy(vision_qkv_order(dims))}
        self.inverse = {k: torch.argsort(v) for k, v in self.forward.items()}


def fuse(t: PlannedTensor, tensors: list[torch.Tensor], orders: _Orders) -> torch.Tensor:
    """HF tensors -> the full (unsplit) MindSpeed-MM tensor."""
    if t.fuse in (QKV_TEXT, QKV_VISION):
        return torch.cat(tensors).index_select(0, orders.forward[t.fuse])
    if t.fuse == GATE_UP:
        return torch.cat(tensors)
    if t.fuse == TIED_COPY:
        return tensors[0].clone()
    return tensors[0]


def unfuse(t: PlannedTensor, full: torch.Tensor, orders: _Orders) -> list[torch.Tensor]:
    """The full MindSpeed-MM tensor -> its HF tensors, in `t.hf` order."""
    if t.fuse == QKV_VISION:
        return [full.index_select(0, orders.inverse[t.fuse])]
    if t.fuse == QKV_TEXT:
        d = orders.dims
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        return [p.clone() for p in full.index_select(0, orders.inverse[t.fuse]).split(sizes)]
    if t.fuse == GATE_UP:
        return [p.clone() for p in full.chunk(2)]
    return [full]


def split_tp(full: torch.Tensor, how: str, tp: int) -> list[torch.Tensor]:
    """One shard per tensor-parallel rank; slices are copied so a saved shard holds only itself."""
    if how == REPLICATE or tp == 1:
        return [full] * tp
    if how == GLU:
        full = full.index_select(0, torch.from_numpy(glu_split_order(full.shape[0], tp)))
    parts = full.tensor_split(tp, dim=1 if how == COL else 0)
    return [p.clone(memory_format=torch.contiguous_format) for p in parts]


def merge_tp(shards: list[torch.Tensor], how: str, name: str) -> torch.Tensor:
    """Inverse of `split_tp`; copies of a replicated tensor must agree."""
    if len(shards) == 1:
        return shards[0]
    if how == REPLICATE:
        if not all(torch.equal(shards[0], s) for s in shards[1:]):
            raise ConvertError(f"{name}: tensor-parallel ranks hold different copies of a replicated tensor")
        return shards[0]
    full = torch.cat(shards, dim=1 if how == COL else 0)
    if how == GLU:
        full = full.index_select(0, torch.argsort(torch.from_numpy(glu_split_order(full.shape[0], len(shards)))))
    return full


# ------------------------------------------------------------------------------ MindSpeed files


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def write_mindspeed(out: Path, stages: StageDicts, layout: PipelineLayout) -> None:
    for tp_rank, per_stage in enumerate(stages):
        for pp_rank in range(layout.pp):
            chunks = [per_stage[chunk * layout.pp + pp_rank] for chunk in range(layout.vpp)]
            payload: dict = {"model": chunks[0]} if layout.vpp == 1 else {f"model{c}": sd for c, sd in enumerate(chunks)}
            payload["checkpoint_version"] = CHECKPOINT_VERSION
            rank_dir = out / RELEASE / rank_dir_name(tp_rank, pp_rank, layout.pp)
            rank_dir.mkdir(parents=True)
            torch.save(payload, rank_dir / MODEL_FILE)
    (out / LATEST_FILE).write_text(RELEASE)


def _iteration_dir(mm_dir: Path) -> Path:
    latest = mm_dir / LATEST_FILE
    if not latest.is_file():
        raise ConvertError(f"{mm_dir}: no {LATEST_FILE}; give a MindSpeed-MM checkpoint directory")
    tag = latest.read_text().strip()
    if tag != RELEASE and not tag.isdigit():
        raise ConvertError(f"{latest}: expected 'release' or an iteration number, got {tag!r}")
    folder = mm_dir / (RELEASE if tag == RELEASE else f"iter_{int(tag):07d}")
    if not folder.is_dir():
        raise ConvertError(f"{latest} names {folder.name}, which does not exist")
    return folder


def _rank_grid(folder: Path) -> tuple[int, int, dict[tuple[int, int], Path]]:
    """(tp, pp, {(tp_rank, pp_rank): file}) from the mp_rank_* directory names."""
    found: dict[tuple[int, int], Path] = {}
    with_pp = set()
    for d in folder.iterdir():
        m = re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", d.name)
        if m is None:
            if d.name.startswith("mp_rank_"):
                raise ConvertError(f"{d}: only tensor and pipeline ranks are supported (no expert parallelism)")
            continue
        with_pp.add(m.group(2) is not None)
        found[(int(m.group(1)), int(m.group(2) or 0))] = d / MODEL_FILE
    if not found:
        raise ConvertError(f"{folder}: no mp_rank_* directories")
    if len(with_pp) > 1:
        raise ConvertError(f"{folder}: mixes mp_rank_XX and mp_rank_XX_YYY directories")
    tp, pp = max(t for t, _ in found) + 1, max(p for _, p in found) + 1
    missing = [rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp)
               if (t, p) not in found or not found[(t, p)].is_file()]
    if missing:
        raise ConvertError(f"{folder}: missing {MODEL_FILE} of {_few(missing)}")
    return tp, pp, found


def _load_rank_file(path: Path, trust_pickle: bool) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise ConvertError(
            f"{path}: holds Python objects besides tensors (a training checkpoint with args or optimizer "
            f"state?); pass --trust-pickle to unpickle it fully, only for a file you trust ({str(e).splitlines()[0]})"
        ) from None


def _model_chunks(payload: dict, path: Path) -> list[dict[str, torch.Tensor]]:
    """The stage state dicts of one file, virtual chunks in order; `_extra_state` entries dropped."""
    if "model" in payload:
        chunks = [payload["model"]]
    else:
        keys = sorted((k for k in payload if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
        if keys != [f"model{i}" for i in range(len(keys))] or not keys:
            raise ConvertError(f"{path}: expected a 'model' entry or 'model0', 'model1', ... entries")
        chunks = [payload[k] for k in keys]
    return [{k: v for k, v in sd.items() if v is not None and not k.endswith("._extra_state")} for sd in chunks]


def read_mindspeed(mm_dir: Path, trust_pickle: bool = False) -> tuple[StageDicts, int, int]:
    """All state dicts as [tp_rank][stage], with pp and vpp."""
    folder = _iteration_dir(Path(mm_dir))
    tp, pp, files = _rank_grid(folder)
    stages: StageDicts = []
    vpp = None
    for tp_rank in range(tp):
        per_rank: dict[int, dict[str, torch.Tensor]] = {}
        for pp_rank in range(pp):
            chunks = _model_chunks(_load_rank_file(files[(tp_rank, pp_rank)], trust_pickle), files[(tp_rank, pp_rank)])
            if vpp not in (None, len(chunks)):
                raise ConvertError(f"{files[(tp_rank, pp_rank)]}: {len(chunks)} virtual chunks, other files have {vpp}")
            vpp = len(chunks)
            per_rank.update({c * pp + pp_rank: sd for c, sd in enumerate(chunks)})
        stages.append([per_rank[s] for s in range(pp * vpp)])
    return stages, pp, vpp


_LAYER_PREFIXES = {"vision": r"image_encoder\.encoder\.blocks\.layers\.(\d+)\.",
                   "text": r"text_decoder\.decoder\.layers\.(\d+)\."}


def infer_layer_counts(stage_dicts: list[dict[str, torch.Tensor]], kind: str) -> list[int]:
    """Per stage, how many layers of `kind` it holds; their local indices must be 0..n-1."""
    counts = []
    for stage, sd in enumerate(stage_dicts):
        indices = {int(m.group(1)) for name in sd if (m := re.match(_LAYER_PREFIXES[kind], name))}
        if indices != set(range(len(indices))):
            raise ConvertError(f"stage {stage}: {kind} layer indices {sorted(indices)} do not run 0..n-1")
        counts.append(len(indices))
    return counts


# --------------------------------------------------------------------------------- conversions


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out` that becomes `out` only if the body succeeds."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out}: already exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)


def _tensor_error(t: PlannedTensor, e: RuntimeError) -> ConvertError:
    return ConvertError(f"{t.mm}: shapes do not fit config.json ({str(e).splitlines()[0]})")


def hf_to_mindspeed(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, llm_pp_layers: list[int] | None = None,
                    vit_pp_layers: list[int] | None = None, vpp: int = 1) -> Path:
    """Write `hf_dir`'s weights as a MindSpeed-MM release checkpoint; returns `out_dir`.

    Without layer lists the model is one pipeline stage.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if (llm_pp_layers is None) != (vit_pp_layers is None):
        raise ConvertError("give both --llm-pp-layers and --vit-pp-layers (one count per pipeline stage each), "
                           "or neither for a single stage")
    dims = ModelDims.from_config(read_config(hf_dir))
    if llm_pp_layers is None:
        llm_pp_layers, vit_pp_layers = [dims.text_layers], [dims.vision_layers]
    layout = PipelineLayout.build(dims, tp, llm_pp_layers, vit_pp_layers, vpp)
    plan = plan_tensors(dims, layout)
    weights = load_hf_weights(hf_dir)
    _check_hf_names(weights, plan, hf_dir)
    orders = _Orders(dims)
    stages: StageDicts = [[{} for _ in range(layout.stages)] for _ in range(tp)]
    for t in plan:
        try:
            shards = split_tp(fuse(t, [weights[n] for n in t.hf], orders), t.tp, tp)
        except RuntimeError as e:
            raise _tensor_error(t, e) from None
        for rank, shard in enumerate(shards):
            stages[rank][t.stage][t.local] = shard
    with _atomic_dir(out) as tmp:
        write_mindspeed(tmp, stages, layout)
    return out


def _check_stage_names(stages: StageDicts, plan: list[PlannedTensor], layout: PipelineLayout) -> None:
    for stage in range(layout.stages):
        expected = {t.local for t in plan if t.stage == stage}
        pp_rank, chunk = layout.rank_and_chunk(stage)
        for tp_rank, per_stage in enumerate(stages):
            got = set(per_stage[stage])
            if got != expected:
                where = rank_dir_name(tp_rank, pp_rank, layout.pp) + (f" model{chunk}" if layout.vpp > 1 else "")
                raise ConvertError(f"{where}: tensors do not match config.json: missing "
                                   f"{_few(sorted(expected - got))}; unexpected {_few(sorted(got - expected))}")


def _layout_of(stages: StageDicts, pp: int, vpp: int, dims: ModelDims, mm_dir: Path, hf_dir: Path) -> PipelineLayout:
    vit, llm = infer_layer_counts(stages[0], "vision"), infer_layer_counts(stages[0], "text")
    try:
        return PipelineLayout.build(dims, len(stages), llm, vit, vpp)
    except ConvertError as e:
        raise ConvertError(f"{mm_dir} (tp {len(stages)}, pp {pp}, vpp {vpp}, vision layers per stage "
                           f"{vit}, text layers per stage {llm}) does not fit {hf_dir}/config.json: {e}") from None


def mindspeed_to_hf(mm_dir: str | Path, hf_dir: str | Path, out_dir: str | Path, *, trust_pickle: bool = False) -> Path:
    """Write a MindSpeed-MM checkpoint as an HF model directory, config and tokenizer from `hf_dir`."""
    mm_dir, hf_dir, out = Path(mm_dir), Path(hf_dir), Path(out_dir)
    dims = ModelDims.from_config(read_config(hf_dir))
    stages, pp, vpp = read_mindspeed(mm_dir, trust_pickle)
    layout = _layout_of(stages, pp, vpp, dims, mm_dir, hf_dir)
    plan = plan_tensors(dims, layout)
    _check_stage_names(stages, plan, layout)
    orders = _Orders(dims)
    weights: dict[str, torch.Tensor] = {}
    for t in plan:
        try:
            full = merge_tp([per_stage[t.stage][t.local] for per_stage in stages], t.tp, t.mm)
            parts = unfuse(t, full, orders)
        except RuntimeError as e:
            raise _tensor_error(t, e) from None
        if t.fuse == TIED_COPY:
            if not torch.equal(full, merge_tp([s[layout.first_stage("text")][EMBEDDING] for s in stages], ROW, EMBEDDING)):
                raise ConvertError(f"{mm_dir}: {t.mm} differs from the word embeddings, but {hf_dir}/config.json "
                                   "ties them (tie_word_embeddings); use a config with untied embeddings")
            continue
        weights.update(zip(t.hf, parts))
    with _atomic_dir(out) as tmp:
        copy_model_files(hf_dir, tmp)
        save_hf_weights(weights, hf_dir, tmp)
    return out

