"""What vltune knows about a model family, in one place: `FamilySpec` and the small records it holds.

A family (qwen2_vl, qwen2_5_vl, qwen3_vl, ...) is data, not branches. Every question code outside this
package and the backends' model entries asks about a model ("how are video positions counted?", "which
modules are the projector?", "may this family pack rows?") is answered by the spec of the model's
`config.json` `model_type`. A family file subclasses the spec of the family it derives from and writes
only what differs, as transformers' modular files do; `core/families/__init__.py` collects them.

numpy and the standard library only: core/ and data/ both import this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .chat_templates import QWEN2_VL_CHAT_TEMPLATE


@dataclass(frozen=True)
class ModelInfo:
    """What data/ and the position code need to know about a model, read from its config.json."""

    model_type: str
    """config.json's `model_type` (never guessed from the path)."""
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int
    tokens_per_second: float
    num_hidden_layers: int
    """Decoder layers of the language model."""
    rotary_layers: int
    """Decoder layers with rotary positions, which AGE strategies pick Circle-RoPE layers among: all of
    them, or a hybrid model's attention layers (`attention_layer_indices`)."""

    @property
    def family(self) -> "FamilySpec":
        from . import get_family

        return get_family(self.model_type)


def attention_layer_indices(layer_types: list[str] | tuple[str, ...] | None, num_layers: int) -> list[int]:
    """The decoder layers with softmax attention and rotary positions: all of them, or where a hybrid
    model's `layer_types` says "full_attention" (Circle-RoPE's AGE counts these)."""
    if not layer_types:
        return list(range(num_layers))
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


@dataclass(frozen=True)
class PositionRule:
    """How 3D M-RoPE ids count time, executed by core/rope2d.py.

    `video_time`:
      * "frame_index": a video's temporal id is its frame-group index (Qwen2-VL);
      * "seconds": frame group a gets int(a * second_per_grid_t * tokens_per_second) (Qwen2.5-VL);
      * "per_frame": every frame group is its own item with t = 1; time lives in timestamp text
        the processor writes before each group (Qwen3-VL).
    """

    video_time: Literal["frame_index", "seconds", "per_frame"]
    mrope_interleaved: bool = False
    """Rotary layout of the three sections: chunked [t..., h..., w...] (Qwen2/2.5) or interleaved (Qwen3)."""
    rotary: Literal["mrope", "text"] = "mrope"
    """"mrope": 3D ids from the media grids; "text": one id per token, media tokens included (Ovis2.5's
    Qwen3 language model). The batch keeps the [3, B, L] layout with three equal rows either way, so
    packing and every other consumer of ids stay one code path; the model is fed row 0."""


@dataclass(frozen=True)
class MediaRule:
    """How images and videos become tokens and pixels (data/ executes it)."""

    image_processor: str = "Qwen2VLImageProcessor"
    video_processor: Literal["Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor", "Ovis2_5VideoProcessor"] = "Qwen2VLVideoProcessor"
    """Whose frame sampling and resize rules data/video.py follows."""
    video_placeholder: Literal["pads", "timestamped_frames"] = "pads"
    """`<|video_pad|>` x N in one span, or per frame group `<t seconds><|vision_start|>pads<|vision_end|>`."""
    processor_class: str = "Qwen2VLProcessor"
    image_tag: str = "<|image_pad|>"
    """What the chat template writes for one image; data/ expands it into `image_tokens`."""
    video_tag: str = "<|video_pad|>"
    image_tokens: tuple[str, str, str] = ("", "<|image_pad|>", "")
    """(open, pad, close): an image becomes open + pad x (merged patches) + close, as the processor
    expands it (Qwen: pads only, the template writes <|vision_start|>/<|vision_end|> itself; Ovis2.5:
    its indicator tokens around the pads)."""
    video_tokens: tuple[str, str, str] = ("", "<|video_pad|>", "")
    span_open: tuple[str, ...] = ("<|vision_start|>",)
    """Tokens that open a media span in the token stream: truncation never cuts inside one."""
    span_close: tuple[str, ...] = ("<|vision_end|>",)
    added_tokens: tuple[str, ...] = ()
    """Special tokens the family's tokenizer adds after Qwen's (the tiny factory appends them in order)."""


@dataclass(frozen=True)
class ModuleMap:
    """Where the parts of the model live, as dotted paths from the HF model root.

    Both backends build the transformers module tree, so one map serves freeze flags, parameter
    groups, LoRA targets, FSDP units, vision sync, speed patches and the MindSpore name map.
    """

    vision_tower: str = "model.visual"
    vision_blocks: str = "model.visual.blocks"
    projectors: tuple[str, ...] = ("model.visual.merger",)
    """Vision -> language projectors: trained by `tune_mm_mlp`, grouped as `merger` (`mm_projector_lr`)."""
    llm: str = "model.language_model"
    decoder_layers: str = "model.language_model.layers"
    embeddings: str = "model.language_model.embed_tokens"
    head: str = "lm_head"
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Default LoRA target modules (names of nn.Linear leaves inside the decoder layers)."""
    lora_target_parameters: tuple[str, ...] = ()
    """Default LoRA target parameters (peft `target_parameters`): fused weights that are not nn.Linear,
    such as MoE experts' `gate_up_proj` / `down_proj`."""
    moe_block: str | None = None
    """Class name of the sparse MoE block (ZeRO-3 leaf module: gathered whole, not per expert)."""
    moe_router: str | None = None
    """Path of the router inside a decoder layer (its output's first item: the router logits [tokens, E])."""
    linear_attention: str | None = None
    """Path of the recurrent token mixer inside a hybrid model's linear-attention decoder layers (Qwen3.5's
    Gated DeltaNet, `linear_attn`): packed rows must restart its state and conv window at every sample."""

    def component_of(self, name: str) -> str:
        """llm | vision | merger for a parameter name (plain, peft-wrapped or a MindSpore cell name)."""
        dotted = "." + name
        if any(f".{p}." in dotted for p in self.projectors):
            return "merger"
        if f".{self.vision_tower}." in dotted:
            return "vision"
        return "llm"

    unreached: tuple[str, ...] = ()
    """Modules of the transformers model that its forward never uses (Ovis2.5's tower post-norm: the visual
    tokenizer reads the last layer's output before it): always frozen."""
    vision_attention: str = "attn"
    """Attribute of a vision block holding its attention module (the varlen vision forward replaces it)."""

    def all_paths(self) -> dict[str, str]:
        """Every module path of the map, by role (the conformance suite resolves each on the tiny model)."""
        paths = {"vision_tower": self.vision_tower, "vision_blocks": self.vision_blocks, "llm": self.llm,
                 "decoder_layers": self.decoder_layers, "embeddings": self.embeddings, "head": self.head}
        paths.update({f"projector_{i}": p for i, p in enumerate(self.projectors)})
        return paths


@dataclass(frozen=True)
class Capabilities:
    """What vltune can do with the family; config validation checks these before a model loads."""

    packing: bool = True
    mdlm: bool = True
    circle_rope: bool = True
    liger: bool = True
    """vltune's Liger wiring (RMSNorm / SwiGLU / fused CE) fits the decoder layers."""
    mindspore: bool = True
    """A native MindSpore model exists (backends/mindspore/models/<family>.py)."""
    zero3: bool = True
    fsdp2: bool = True
    sequence_parallel: bool = True
    """Ulysses sequence parallelism: every layer that mixes tokens does so per head (attention, Gated
    DeltaNet), so an all-to-all can trade token shards for head shards around it."""
    mindspeed: bool = False
    """`vltune convert` to and from MindSpeed-MM."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set speed, memory and FLOPs; also what `config_json` builds a config from.

    Released shapes (`FamilySpec.shapes`) carry the released config.json values; the tiny factory
    passes its own small ones.
    """

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    patch_size: int = 14
    merge_size: int = 2
    window_size: int = 112
    fullatt_blocks: tuple[int, ...] = ()
    deepstack: tuple[int, ...] = ()
    head_dim: int | None = None
    num_position_embeddings: int = 2304
    """Qwen3-VL's learned vision position grid (48 x 48 in the releases)."""
    max_position_embeddings: int = 32768
    experts: int = 0
    """MoE: routed experts per layer (0 = dense MLP)."""
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    """MoE: width of the always-on shared expert (0 = none)."""
    layer_types: tuple[str, ...] = ()
    """Hybrid models: "full_attention" / "linear_attention" per decoder layer (empty = all full attention)."""
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    partial_rotary: float = 1.0
    """Fraction of the attention head dim that is rotated (Qwen3.5: 0.25)."""
    temporal_patch: int = 2
    """Frames per patch of the tower's patch embedding (Qwen: 2; Ovis2.5: 1)."""
    visual_vocab: int = 0
    """Ovis2.5: rows of the visual embedding table (its visual tokenizer's softmax width + 4 indicators)."""

    @property
    def attention_layers(self) -> int:
        """Decoder layers with softmax attention (all of them unless `layer_types` says otherwise)."""
        return len(attention_layer_indices(self.layer_types, self.layers))

    @property
    def text_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass(frozen=True)
class TokenIds:
    """Special token ids a config.json carries; from the tokenizer, never literals."""

    image: int
    video: int
    vision_start: int
    vision_end: int
    bos: int
    eos: int
    pad: int
    video_start: int | None = None
    """Ovis2.5's video indicator tokens (Qwen's videos share <|vision_start|> / <|vision_end|>)."""
    video_end: int | None = None


class FamilySpec:
    """One model family. Subclass the family yours derives from and override only what differs."""

    name: str = ""
    """config.json's `model_type`."""
    architecture: str = ""
    """transformers' class name (config.json `architectures`), also the torch backend's model class."""
    chat_template: str = QWEN2_VL_CHAT_TEMPLATE
    """The chat template (jinja) the family's released tokenizer carries; the tiny factory writes it."""
    position: PositionRule = PositionRule("frame_index")
    media: MediaRule = MediaRule()
    modules: ModuleMap = ModuleMap()
    capabilities: Capabilities = Capabilities()
    vision_mlp_matrices: int = 3
    """Weight matrices of one vision block's MLP (3 for SwiGLU, 2 for a GELU MLP): FLOPs."""
    shapes: dict[str, ModelShape] = {}
    """Released sizes by name (`vltune bench --model-shape NAME`)."""
    mindspeed_rules: tuple | None = None
    """The HF <-> MindSpeed-MM name table (core/families/mindspeed.py's TensorRule), for `vltune convert`;
    set where `capabilities.mindspeed` is."""
    capability_reasons: dict[str, str] = {}
    """Why a capability flag is off, by flag name: the recipe check's message says it."""
    untrained_prefixes: tuple[str, ...] = ()
    """Checkpoint tensors the transformers model does not load (Qwen3.5's multi-token-prediction head,
    `mtp.`): vltune does not train them, and a saved model carries them over from its source unchanged."""
    released_token_ids: TokenIds | None = None
    """The special token ids of the released tokenizer (what their config.json files carry): the bench's
    models of a released shape use them, having no tokenizer of their own."""
    training_chat_template: str | None = None
    """The template data/ renders training and evaluation conversations with, when the family's recipe
    labels answers differently from its released template (Ovis2.5's template drops reasoning from
    every answer; its training formatter keeps it). None: the model directory's own template."""
    trains_turn_newline: bool = True
    """Whether the `\n` after an answer's `<|im_end|>` is trained (Qwen's scripts: yes; Ovis: no)."""
    train_module_aliases: dict[str, tuple[str, ...]] = {}
    """`train_modules` names (the Ovis recipe's) -> module paths from the HF model root ("" = all)."""

    # -- config.json -> what vltune needs -----------------------------------------------------

    @staticmethod
    def text_section(config: dict) -> dict:
        """The language model's keys (nested `text_config` in transformers 5, flat in older releases)."""
        return config.get("text_config") or config

    def info(self, config: dict) -> ModelInfo:
        vision, text = config.get("vision_config", {}), self.text_section(config)
        return ModelInfo(
            model_type=self.name,
            image_token_id=config["image_token_id"],
            video_token_id=config["video_token_id"],
            vision_start_token_id=config["vision_start_token_id"],
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            tokens_per_second=vision.get("tokens_per_second", 2),
            num_hidden_layers=text["num_hidden_layers"],
            rotary_layers=len(attention_layer_indices(text.get("layer_types"), text["num_hidden_layers"])),
        )

    def token_ids(self, ids: dict[str, int]) -> TokenIds:
        """The TokenIds of a tokenizer's added vocabulary (token string -> id), by the media rule's tokens."""
        media = self.media
        return TokenIds(image=ids[media.image_tokens[1]], video=ids[media.video_tokens[1]],
                        vision_start=ids[media.span_open[0]], vision_end=ids[media.span_close[0]],
                        bos=ids["<|endoftext|>"], eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"],
                        video_start=ids.get(media.span_open[-1]), video_end=ids.get(media.span_close[-1]))

    def vision_sizes(self, vision: dict) -> tuple[int, int]:
        """(hidden, intermediate) of the vision blocks."""
        return vision["hidden_size"], vision["intermediate_size"]

    def shape(self, config: dict) -> ModelShape:
        """The ModelShape of a config.json dict (any size: the tiny test models too)."""
        text = self.text_section(config)
        vision = config["vision_config"]
        heads = text["num_attention_heads"]
        vision_hidden, vision_intermediate = self.vision_sizes(vision)
        return ModelShape(
            name=self.name, model_type=self.name, hidden=text["hidden_size"], intermediate=text.get("intermediate_size", 0),
            layers=text["num_hidden_layers"], heads=heads, kv_heads=text.get("num_key_value_heads", heads),
            vocab=text["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_hidden=vision_hidden, vision_intermediate=vision_intermediate, vision_depth=vision["depth"],
            vision_heads=vision["num_heads"], patch_size=vision.get("patch_size", 14),
            merge_size=vision.get("spatial_merge_size", 2), window_size=vision.get("window_size", 112),
            fullatt_blocks=tuple(vision.get("fullatt_block_indexes", ())),
            deepstack=tuple(vision.get("deepstack_visual_indexes", ())), head_dim=text.get("head_dim"),
            num_position_embeddings=vision.get("num_position_embeddings", 2304),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            # transformers 5 writes `num_local_experts` (its attribute map), released checkpoints `num_experts`
            experts=text.get("num_experts", text.get("num_local_experts", 0)), experts_per_token=text.get("num_experts_per_tok", 0),
            moe_intermediate=text.get("moe_intermediate_size", 0),
            shared_expert_intermediate=text.get("shared_expert_intermediate_size", 0),
            layer_types=tuple(text.get("layer_types") or ()),
            linear_key_heads=text.get("linear_num_key_heads", 0), linear_value_heads=text.get("linear_num_value_heads", 0),
            linear_key_head_dim=text.get("linear_key_head_dim", 0), linear_value_head_dim=text.get("linear_value_head_dim", 0),
            linear_conv_kernel=text.get("linear_conv_kernel_dim", 0),
            partial_rotary=(text.get("rope_parameters") or {}).get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)),
        )

    def llm_params(self, shape: ModelShape) -> int:
        """Weights a text token passes through, the token embedding excluded (the LM head included)."""
        hd = shape.text_head_dim
        attn = shape.hidden * shape.heads * hd * 2 + shape.hidden * shape.kv_heads * hd * 2
        return shape.layers * (attn + self.mlp_params(shape)) + shape.hidden * shape.vocab

    def sequence_mixing_flops(self, shape: ModelShape, seq_lens: list[int], multiplier: int = 6) -> float:
        """FLOPs of the token-token interactions that no weight count covers: softmax attention's
        `2 * m * heads * head_dim * n**2` per attention layer and sequence of n tokens (torchtitan's term,
        QK^T and AV, causality not halved). A hybrid family adds its recurrent layers' term."""
        squares = sum(n * n for n in seq_lens)
        return 2 * multiplier * shape.attention_layers * shape.heads * shape.text_head_dim * squares

    def merger_params(self, shape: ModelShape) -> int:
        """Weights one merged visual token passes through after the tower: the 2-layer patch merger (and
        Qwen3-VL's DeepStack mergers)."""
        merger_in = shape.vision_hidden * shape.merge_size**2
        return (merger_in * merger_in + merger_in * shape.hidden) * (1 + len(shape.deepstack))

    def mlp_params(self, shape: ModelShape) -> int:
        """Weights of one decoder layer's MLP that a token passes through: the SwiGLU MLP, or for an MoE
        layer the router and the experts the token is routed to (not all of them)."""
        if shape.experts:
            shared = 3 * shape.hidden * shape.shared_expert_intermediate + shape.hidden if shape.shared_expert_intermediate else 0
            return shape.hidden * shape.experts + shape.experts_per_token * 3 * shape.hidden * shape.moe_intermediate + shared
        return 3 * shape.hidden * shape.intermediate

    # -- ModelShape -> config.json (the tiny factory and the bench) ------------------------------

    def mrope_section(self, head_dim: int) -> list[int]:
        """The released [16, 24, 24] split of head_dim 128 (time 1/4, height and width 3/8 each), scaled."""
        half = head_dim // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]

    def rope_parameters(self, shape: ModelShape) -> dict:
        return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": self.mrope_section(shape.text_head_dim)}

    def text_config(self, shape: ModelShape, ids: TokenIds) -> dict:
        return {
            "model_type": f"{self.name}_text",
            "vocab_size": shape.vocab,
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": shape.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_parameters": self.rope_parameters(shape),
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "pad_token_id": ids.pad,
            "tie_word_embeddings": shape.tie_word_embeddings,
        }

    def vision_config(self, shape: ModelShape) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define vision_config")

    def config_json(self, shape: ModelShape, ids: TokenIds) -> dict:
        """A config.json dict of this shape, as a released checkpoint of the family writes it."""
        return {
            "architectures": [self.architecture],
            "model_type": self.name,
            "image_token_id": ids.image,
            "video_token_id": ids.video,
            "vision_start_token_id": ids.vision_start,
            "vision_end_token_id": ids.vision_end,
            "tie_word_embeddings": shape.tie_word_embeddings,
            "text_config": self.text_config(shape, ids),
            "vision_config": self.vision_config(shape),
        }

    def processor_configs(self) -> dict[str, dict]:
        """The processor JSON files a released checkpoint ships, by file name."""
        raise NotImplementedError(f"{type(self).__name__} must define processor_configs")

    def tiny_processor_configs(self) -> dict[str, dict]:
        """The processor files of the tiny models: the released ones unless the family's pixel bounds
        would make every test image large (Ovis2.5's 448 x 448 minimum)."""
        return self.processor_configs()

    def tiny_shape(self, *, text_hidden: int, text_layers: int, text_heads: int, text_kv_heads: int,
                   text_intermediate: int, vision_hidden: int, vision_layers: int, vision_heads: int,
                   vision_intermediate: int, vocab: int, tie_word_embeddings: bool) -> ModelShape:
        """The tiny factory's ModelShape: its sizes plus the family's small-model choices."""
        return ModelShape(
            name=f"{self.name}-tiny", model_type=self.name, hidden=text_hidden, intermediate=text_intermediate,
            layers=text_layers, heads=text_heads, kv_heads=text_kv_heads, vocab=vocab,
            tie_word_embeddings=tie_word_embeddings, vision_hidden=vision_hidden,
            vision_intermediate=vision_intermediate, vision_depth=vision_layers, vision_heads=vision_heads,
            max_position_embeddings=4096,
        )

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- train_modules names (core/train_modules.py) ----------------------------------------------

    @property
    def train_modules_table(self) -> dict[str, tuple[str, ...]]:
        """`train_modules` names -> module paths: the family's own `train_module_aliases`, else `all`, `llm`
        (language model + head), `vision` (the tower without the projectors inside it, `!` = carved out)
        and `merger` (the projectors), derived from the module map."""
        own = getattr(self, "train_module_aliases", None)  # a class attribute of the families that have their own
        if own:
            return dict(own)
        m = self.modules
        inside = tuple(f"!{p}" for p in m.projectors if p.startswith(m.vision_tower + "."))
        return {"all": ("",), "llm": (m.llm, m.head), "vision": (m.vision_tower, *inside), "merger": tuple(m.projectors)}
