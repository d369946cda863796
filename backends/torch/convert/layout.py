"""The pure half of `vltune convert`: which tensor goes where, under which name, split which way.

Numpy only (no torch): model sizes from config.json, the pipeline layout and its validation, the
planned tensors of the family's HF <-> MindSpeed-MM name table (core/families), and the row orders of
the q/k/v interleave and the GLU split. The torch half (`mindspeed.py`) applies these to tensors and reads and writes the files. REFERENCE.md s6
and the module docstring of `mindspeed.py` describe the MindSpeed-MM layout itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate, groupby

import numpy as np

from vltune.core.config import ConfigError
from vltune.core.families import family_names, get_family
from vltune.core.families.mindspeed import OUTPUT_LAYER, TEXT_LAYER, TIED_COPY, VISION_LAYER, TensorRule

SUPPORTED_MODEL_TYPES = family_names("mindspeed")


class ConvertError(ConfigError):
    """Bad converter input (layer lists, directories, checkpoint contents); the CLI prints it as one line."""


# ----------------------------------------------------------------------------------------- sizes


def _need(section: dict, key: str, where: str) -> int:
    if key not in section:
        raise ConvertError(f"config.json: {where} has no {key!r}; cannot size the tensors")
    return int(section[key])


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Qwen2.5-VL checkpoint that decide tensor shapes and splits."""

    text_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    """`tie_word_embeddings`: the LM head is the embedding matrix (no `lm_head.weight` in HF files)."""
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    merge_size: int
    rules: tuple = field(default=(), compare=False, repr=False)
    """The family's HF <-> MindSpeed-MM name table (FamilySpec.mindspeed_rules)."""

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads

    @property
    def projector_hidden(self) -> int:
        """Width of the merger MLP: merge_size^2 neighbouring patches concatenated."""
        return self.vision_hidden * self.merge_size**2

    @classmethod
    def from_config(cls, config: dict) -> ModelDims:
        """Read config.json; both the transformers-5 layout (`text_config`) and the flat released one."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConvertError(
                f"config.json: model_type {model_type!r} is not supported by vltune convert "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        text = config.get("text_config") or config
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ConvertError("config.json: no vision_config; is this a vision-language model directory?")
        hidden = _need(text, "hidden_size", "text_config")
        heads = _need(text, "num_attention_heads", "text_config")
        # transformers forwards a text_config-level tie to the top level (pre-v5 saves put it there).
        tied = bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        return cls(
            text_layers=_need(text, "num_hidden_layers", "text_config"),
            hidden=hidden,
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate=_need(text, "intermediate_size", "text_config"),
            vocab=_need(text, "vocab_size", "text_config"),
            tied=tied,
            vision_layers=_need(vision, "depth", "vision_config"),
            vision_hidden=_need(vision, "hidden_size", "vision_config"),
            vision_heads=_need(vision, "num_heads", "vision_config"),
            vision_intermediate=_need(vision, "intermediate_size", "vision_config"),
            merge_size=_need(vision, "spatial_merge_size", "vision_config"),
            rules=get_family(model_type).mindspeed_rules,
        )


# -------------------------------------------------------------------------------------- pipeline

VISION, TEXT = "vision", "text"


def parse_layer_list(text: str, flag: str) -> list[int]:
    """'1,10,10,7' -> [1, 10, 10, 7]; anything else is a ConvertError naming the flag."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConvertError(f"{flag} {text!r}: expected comma-separated layer counts such as 1,10,10,7") from None


@dataclass(frozen=True)
class PipelineLayout:
    """Where every layer lives. Stage s = chunk * pp + pp_rank is the s-th piece in pipeline order.

    `vit[s]` / `llm[s]` are the vision / text layer counts of stage s; with a virtual pipeline
    (vpp > 1) pipeline rank r holds the chunks s = r, pp + r, 2 pp + r, ...
    """

    tp: int
    pp: int
    vpp: int
    vit: tuple[int, ...]
    llm: tuple[int, ...]

    @classmethod
    def build(cls, dims: ModelDims, tp: int, llm_pp_layers: list[int], vit_pp_layers: list[int],
              vpp: int = 1) -> PipelineLayout:
        """Validate the parallel settings against the model; every problem is reported at once."""
        problems = _layer_list_problems(dims, llm_pp_layers, vit_pp_layers, vpp)
        problems += _tp_problems(dims, tp)
        if problems:
            raise ConvertError("; ".join(problems))
        return cls(tp=tp, pp=len(llm_pp_layers) // vpp, vpp=vpp, vit=tuple(vit_pp_layers), llm=tuple(llm_pp_layers))

    @property
    def stages(self) -> int:
        return self.pp * self.vpp

    def rank_and_chunk(self, stage: int) -> tuple[int, int]:
        """(pipeline rank, virtual chunk) of stage `stage`."""
        return stage % self.pp, stage // self.pp

    def counts(self, kind: str) -> tuple[int, ...]:
        return self.vit if kind == VISION else self.llm

    def first_stage(self, kind: str) -> int:
        """The stage holding the kind's first layer: the vision patch embedding / the text embedding go there."""
        return next(s for s, n in enumerate(self.counts(kind)) if n)

    def last_stage(self, kind: str) -> int:
        """The stage holding the kind's last layer: the projector / final norm and output layer go there."""
        return max(s for s, n in enumerate(self.counts(kind)) if n)

    def place_layer(self, kind: str, index: int) -> tuple[int, int]:
        """Global layer `index` -> (stage, index inside that stage); indices restart at 0 per stage."""
        counts = self.counts(kind)
        for stage, end in enumerate(accumulate(counts)):
            if index < end:
                return stage, index - (end - counts[stage])
        raise IndexError(f"{kind} layer {index} is beyond the {sum(counts)} layers of the layout")


def _layer_list_problems(dims: ModelDims, llm: list[int], vit: list[int], vpp: int) -> list[str]:
    problems = []
    if vpp < 1:
        return [f"--vpp {vpp}: must be at least 1"]
    if len(llm) != len(vit):
        problems.append(f"--llm-pp-layers has {len(llm)} entries but --vit-pp-layers has {len(vit)}; "
                        "give one count per pipeline stage to both")
    elif len(llm) % vpp:
        problems.append(f"--vpp {vpp} does not divide the {len(llm)} stages of the layer lists "
                        "(give pp * vpp counts, chunk 0 of every rank first)")
    elif vpp > 1 and len(llm) == vpp:
        problems.append(f"--vpp {vpp} with {len(llm)} stages in the layer lists leaves one pipeline rank; "
                        "a virtual pipeline needs at least two")
    for flag, counts, total, key in (("--llm-pp-layers", llm, dims.text_layers, "text_config.num_hidden_layers"),
                                     ("--vit-pp-layers", vit, dims.vision_layers, "vision_config.depth")):
        listed = ",".join(map(str, counts))
        if any(n < 0 for n in counts):
            problems.append(f"{flag} {listed}: layer counts cannot be negative")
        elif sum(counts) != total:
            problems.append(f"{flag} {listed} sums to {sum(counts)} but the model has {total} layers ({key})")
    if problems:
        return problems
    last_vit = max((s for s, n in enumerate(vit) if n), default=-1)
    first_llm = next(s for s, n in enumerate(llm) if n)
    if last_vit > first_llm:
        problems.append(
            f"--vit-pp-layers {','.join(map(str, vit))} puts vision layers on stage {last_vit} but "
            f"--llm-pp-layers {','.join(map(str, llm))} starts the text layers on stage {first_llm}; "
            "the vision tower must come before the text layers in pipeline order")
    return problems


def _tp_problems(dims: ModelDims, tp: int) -> list[str]:
    if tp < 1:
        return [f"--tp {tp}: must be at least 1"]
    sizes = (
        ("text_config.num_key_value_heads", dims.kv_heads),
        ("text_config.num_attention_heads", dims.heads),
        ("text_config.intermediate_size", dims.intermediate),
        ("text_config.vocab_size", dims.vocab),
        ("vision_config.num_heads", dims.vision_heads),
        ("vision_config.intermediate_size", dims.vision_intermediate),
        ("the merger width (vision hidden * merge^2)", dims.projector_hidden),
    )
    bad = [f"{name} = {value}" for name, value in sizes if value % tp]
    return [f"--tp {tp} does not divide {', '.join(bad)}"] if bad else []


# ------------------------------------------------------------------------------------ name table

# The name table and its vocabulary live with the families (core/families/mindspeed.py); each family
# that converts has its table (`FamilySpec.mindspeed_rules`), which ModelDims carries.

# Some transformers versions and tools save the module tree's names (one level down); read both spellings.
HF_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_hf_name(name: str) -> str:
    """'model.language_model.layers.0...' -> 'model.layers.0...' (the released checkpoints' names)."""
    for new, old in HF_ALIASES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


@dataclass(frozen=True)
class PlannedTensor:
    """One rule at one layer: concrete names and the stage whose file holds it."""

    hf: tuple[str, ...]
    mm: str
    """The global MindSpeed-MM name (layer index counted over the whole model)."""
    local: str
    """The name inside its stage's state dict (layer index restarted at 0 on each stage)."""
    stage: int
    fuse: str
    tp: str


def _planned(rule: TensorRule, layout: PipelineLayout, n: int | None = None, *,
             hf: tuple[str, ...] | None = None, fuse: str | None = None) -> PlannedTensor:
    if rule.scope in (VISION_LAYER, TEXT_LAYER):
        stage, local = layout.place_layer(VISION if rule.scope == VISION_LAYER else TEXT, n)
    else:
        kind = VISION if rule.scope.startswith("vision") else TEXT
        stage = layout.first_stage(kind) if rule.scope.endswith("first") else layout.last_stage(kind)
        local = None
    return PlannedTensor(
        hf=hf or tuple(h.format(n=n) for h in rule.hf), mm=rule.mm.format(n=n),
        local=rule.mm.format(n=n if local is None else local), stage=stage, fuse=fuse or rule.fuse, tp=rule.tp)


def plan_tensors(dims: ModelDims, layout: PipelineLayout) -> list[PlannedTensor]:
    """Every MindSpeed-MM tensor of the model, in file order, with its HF sources and its stage.

    Tied heads: HF stores no `lm_head`; MindSpeed-MM (Megatron) keeps no output layer where the
    embedding and the last text layer share a stage, and a copy of the embedding on the last text
    stage otherwise (Megatron keeps that copy in sync through the embedding-group all-reduce).
    """
    plan = []
    for scope, group in groupby(dims.rules, key=lambda r: r.scope):
        rules = list(group)
        if scope in (VISION_LAYER, TEXT_LAYER):
            count = dims.vision_layers if scope == VISION_LAYER else dims.text_layers
            plan += [_planned(rule, layout, n) for n in range(count) for rule in rules]
            continue
        for rule in rules:
            if rule.mm != OUTPUT_LAYER or not dims.tied:
                plan.append(_planned(rule, layout))
            elif layout.first_stage(TEXT) != layout.last_stage(TEXT):
                plan.append(_planned(rule, layout, hf=("model.embed_tokens.weight",), fuse=TIED_COPY))
    return plan


# ------------------------------------------------------------------------------------ row orders


def qkv_interleave_order(groups: int, q_rows: int, kv_rows: int) -> np.ndarray:
    """Row order taking [Q; K; V] to MindSpeed-MM's [q_0, k_0, v_0, q_1, k_1, v_1, ...].

    Q has `groups * q_rows` rows (all query heads of a group together), K and V `groups * kv_rows`.
    Grouping by KV head is what lets a contiguous tensor-parallel row split hand each rank whole
    attention groups. The inverse order is `np.argsort` of this one.
    """
    q = np.arange(groups * q_rows).reshape(groups, q_rows)
    k = groups * q_rows + np.arange(groups * kv_rows).reshape(groups, kv_rows)
    v = groups * (q_rows + kv_rows) + np.arange(groups * kv_rows).reshape(groups, kv_rows)
    return np.concatenate([q, k, v], axis=1).reshape(-1)


def text_qkv_order(dims: ModelDims) -> np.ndarray:
    """GQA: per KV head, its `heads / kv_heads` query heads, then its key head and value head."""
    return qkv_interleave_order(dims.kv_heads, dims.heads // dims.kv_heads * dims.head_dim, dims.head_dim)


def vision_qkv_order(dims: ModelDims) -> np.ndarray:
    """The vision tower has plain multi-head attention: one group per head."""
    return qkv_interleave_order(dims.vision_heads, dims.vision_head_dim, dims.vision_head_dim)


def glu_split_order(rows: int, tp: int) -> np.ndarray:
    """Row order of a [gate; up] tensor after which a contiguous `tp`-way split gives rank r [gate_r; up_r].

    Megatron's fused GLU computes `act(x[:half]) * x[half:]` on each rank's shard, so every shard
    must hold matching gate and up rows.
    """
    half = rows // 2
    gate = np.arange(half).reshape(tp, half // tp)
    return np.concatenate([gate, half + gate], axis=1).reshape(-1)
