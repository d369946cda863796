"""Ovis2.5 on MindSpore: the SigLIP2-NaViT tower (siglip2.py), the visual tokenizer, the visual embedding
table and a Qwen3 language model, with transformers 5's module tree and parameter names.

transformers' `Ovis2_5ForConditionalGeneration`:

* `model.vision_tower`: one feature per patch, in window order (siglip2.py);
* `model.multi_modal_projector.visual_tokenizer`: 2 x 2 patches concatenated, `linear` to the visual
  vocabulary less its indicator rows, `norm` (LayerNorm, eps 1e-5), softmax in fp32, then zero
  probabilities appended for the indicator rows;
* `model.multi_modal_projector.visual_embeddings_table`: a bias-free Linear(visual vocab -> hidden), so a
  visual token's embedding is its probability-weighted mix of the table's columns; the start / end tokens
  around an image (video) take the columns of indicator ids vocab-4, vocab-3 (vocab-2, vocab-1) instead of
  their text embeddings -- only in a forward that encodes that kind of media, as transformers does;
* `model.language_model`: Qwen3 (q/k RMSNorm, no biases) with 1-D rotary. That is text.py's decoder with
  every rotary frequency reading position row 0 (the batch's three rows are equal for this family).

Checkpoints come in the original Ovis layout (`llm.*`, `visual_tokenizer.vit.vision_model.*`,
`visual_tokenizer.head.{0,1}`, `vte.weight` stored [vocab, hidden]), which transformers renames on load and
restores on save; `HF_NAMES` is that table here, used by checkpoint.py in both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from vltune.core.families import get_family

from ..attention import Kernels
from .config import TextConfig, VLConfig
from .entry import MindSporeModel
from .layers import LayerNorm, Linear
from .qwen_vl import ModelInputs, QwenVLForConditionalGeneration
from .siglip2 import Ovis2_5VisionModel, Siglip2VisionConfig
from .text import KVCache, TextModel


# -- config.json ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ovis2_5Config(VLConfig):
    """VLConfig with the tower's own config and the ids of the tokens around each image and video."""

    image_start_token_id: int = -1
    image_end_token_id: int = -1
    video_start_token_id: int = -1
    video_end_token_id: int = -1

    @classmethod
    def from_dict(cls, cfg: dict) -> "Ovis2_5Config":
        spec = get_family(cfg.get("model_type"), "config.json model_type")
        text = spec.text_section(cfg)
        if text.get("use_sliding_window"):
            raise ValueError("Ovis2.5 with use_sliding_window: true has no MindSpore model (the released LLMs "
                             "attend in full); use backend: torch")
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        rope = text.get("rope_parameters") or {}
        text_cfg = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1000000.0))),
            # 1-D rotary: every frequency reads row 0 of the [3, B, L] positions (its rows are equal)
            mrope_section=(head_dim // 2, 0, 0),
            mrope_interleaved=False,
            attention_bias=bool(text.get("attention_bias", False)),
            qk_norm=True,
            hidden_act=text.get("hidden_act", "silu"),
        )
        info, released = spec.info(cfg), spec.released_token_ids  # transformers' defaults are the released ids
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(
            spec.name, text_cfg, Siglip2VisionConfig.from_dict(cfg["vision_config"]),
            info.image_token_id, info.video_token_id, bool(tie), raw=cfg,
            image_start_token_id=cfg.get("image_start_token_id", released.vision_start),
            image_end_token_id=cfg.get("image_end_token_id", released.vision_end),
            video_start_token_id=cfg.get("video_start_token_id", released.video_start),
            video_end_token_id=cfg.get("video_end_token_id", released.video_end),
        )


# -- checkpoint names ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OvisCheckpointNames:
    """The original Ovis layout <-> transformers' names (transformers' conversion_mapping for this family)."""

    renames: tuple[tuple[str, str], ...]
    transposed: tuple[str, ...]
    """Native names whose tensors the original layout stores transposed."""

    def _is_original(self, names) -> bool:
        return any(re.match(src, n) for n in names for src, _ in self.renames)

    def to_native(self, tensors: dict, dtypes: dict, layout: str) -> tuple[dict, dict, str]:
        """(tensors, dtypes, layout) as read from the files -> native names; layout "original" when renamed."""
        if not self._is_original(tensors):
            return tensors, dtypes, layout

        def rename(name: str) -> str:
            for src, dst in self.renames:
                name = re.sub(src, dst, name)
            return name

        out = {rename(k): v for k, v in tensors.items()}
        for name in self.transposed:
            if name in out:
                out[name] = np.ascontiguousarray(out[name].T)
        return out, {rename(k): v for k, v in dtypes.items()}, "original"

    def to_hf(self, name: str, array: np.ndarray, layout: str) -> tuple[str, np.ndarray]:
        """A native (name, array) in the file layout it was loaded from."""
        if layout != "original":
            return name, array
        if name in self.transposed:
            array = np.ascontiguousarray(array.T)
        for src, dst in self.renames:
            native = dst.replace("\\", "")
            if name.startswith(native):
                return src.lstrip("^").replace("\\", "") + name[len(native):], array
        return name, array


HF_NAMES = OvisCheckpointNames(
    renames=(
        (r"^llm\.model\.", "model.language_model."),
        (r"^llm\.lm_head\.", "lm_head."),
        (r"^visual_tokenizer\.vit\.vision_model\.embeddings\.", "model.vision_tower.embeddings."),
        (r"^visual_tokenizer\.vit\.vision_model\.encoder\.layers\.", "model.vision_tower.layers."),
        (r"^visual_tokenizer\.vit\.vision_model\.post_layernorm\.", "model.vision_tower.post_layernorm."),
        (r"^visual_tokenizer\.head\.0\.", "model.multi_modal_projector.visual_tokenizer.linear."),
        (r"^visual_tokenizer\.head\.1\.", "model.multi_modal_projector.visual_tokenizer.norm."),
        (r"^vte\.", "model.multi_modal_projector.visual_embeddings_table."),
    ),
    transposed=("model.multi_modal_projector.visual_embeddings_table.weight",),
)


# -- projector -------------------------------------------------------------------------------------------


class Ovis2_5VisualTokenProjector(nn.Cell):
    """`visual_tokenizer`: patch features [n_patches, E] -> visual-token probabilities [n_tokens, vocab]."""

    def __init__(self, cfg: Siglip2VisionConfig):
        super().__init__()
        self.unit = cfg.spatial_merge_size**2
        self.indicators = cfg.num_visual_indicator_tokens
        tokens = cfg.vocab_size - cfg.num_visual_indicator_tokens
        self.linear = Linear(cfg.hidden_size * self.unit, tokens, bias=False)
        self.norm = LayerNorm(tokens, 1e-5)  # nn.LayerNorm's default: transformers passes no eps here

    def construct(self, features: Tensor) -> Tensor:
        merged = features.reshape(features.shape[0] // self.unit, -1)
        logits = self.norm(self.linear(merged))
        probs = ops.softmax(logits.astype(ms.float32), axis=-1).astype(logits.dtype)
        return ops.cat((probs, ops.zeros((probs.shape[0], self.indicators), probs.dtype)), axis=-1)


class Ovis2_5MultiModalProjector(nn.Cell):
    """`multi_modal_projector`: the visual tokenizer, then the visual embedding table (weight [hidden, vocab])."""

    def __init__(self, cfg: Siglip2VisionConfig, text_hidden: int):
        super().__init__()
        self.visual_tokenizer = Ovis2_5VisualTokenProjector(cfg)
        self.visual_embeddings_table = Linear(cfg.vocab_size, text_hidden, bias=False)
        self.vocab, self.indicators = cfg.vocab_size, cfg.num_visual_indicator_tokens

    def construct(self, features: Tensor) -> Tensor:
        return self.visual_embeddings_table(self.visual_tokenizer(features))

    def indicator_features(self) -> Tensor:
        """[indicators, hidden]: the table's columns for the indicator ids (image start, image end, video
        start, video end), the last ones of the visual vocabulary."""
        return self.visual_embeddings_table.weight[:, self.vocab - self.indicators :].T


# -- model -----------------------------------------------------------------------------------------------


class Ovis2_5Model(nn.Cell):
    """`model`: vision tower, projector, language model."""

    def __init__(self, cfg: Ovis2_5Config, kernels: Kernels):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = Ovis2_5VisionModel(cfg.vision, kernels)
        self.multi_modal_projector = Ovis2_5MultiModalProjector(cfg.vision, cfg.text.hidden_size)
        self.language_model = TextModel(cfg.text, kernels)

    @property
    def visual(self) -> Ovis2_5VisionModel:
        """The tower under the Qwen models' attribute name (the engine's recompute switch reads it)."""
        return self.vision_tower

    def encode(self, pixels: Tensor, grid_thw: np.ndarray) -> Tensor:
        """[n_tokens, hidden]: the LLM input embeddings of the merged visual tokens, in transformers' order."""
        return self.multi_modal_projector(self.vision_tower(pixels, grid_thw))

    def _media(self, inputs: ModelInputs) -> list[tuple[str, Tensor, int, tuple[int, int], int]]:
        """(kind, its visual embeddings, how many images/videos, its start/end token ids, its first
        indicator row) for each kind of media in the batch, images first (ModelInputs' row order)."""
        cfg, out = self.cfg, []
        if inputs.pixel_values is not None:
            grids = np.asarray(inputs.image_grid_thw).reshape(-1, 3)
            out.append(("image", self.encode(inputs.pixel_values, grids), len(grids),
                        (cfg.image_start_token_id, cfg.image_end_token_id), 0))
        if inputs.pixel_values_videos is not None:
            grids = np.asarray(inputs.video_grid_thw).reshape(-1, 3)
            out.append(("video", self.encode(inputs.pixel_values_videos, grids), len(grids),
                        (cfg.video_start_token_id, cfg.video_end_token_id), 2))
        return out

    def construct(self, inputs: ModelInputs, cache: KVCache | None = None) -> Tensor:
        """Logits-ready hidden states [B, L, H]: token embeddings, each pad token replaced by its visual
        embedding and each start / end token of an encoded image or video by its indicator embedding."""
        embeds = self.language_model.embed_tokens(inputs.input_ids)
        b, length, hidden = embeds.shape
        if inputs.embed_index is not None:
            media = self._media(inputs)
            rows = [embeds.reshape(b * length, hidden)] + [features.astype(embeds.dtype) for _, features, *_ in media]
            index = inputs.embed_index.asnumpy().copy()  # [B*L] into the rows; the indicators go after them
            indicator_row = sum(int(r.shape[0]) for r in rows)
            ids = inputs.input_ids.asnumpy().reshape(-1)
            for kind, _, count, boundary_ids, first in media:
                for offset, token in enumerate(boundary_ids):
                    where = np.flatnonzero(ids == token)
                    if len(where) != count:
                        raise ValueError(f"{count} {kind}(s) in the batch but {len(where)} boundary tokens with id {token}")
                    index[where] = indicator_row + first + offset
            rows.append(self.multi_modal_projector.indicator_features().astype(embeds.dtype))
            embeds = ops.gather(ops.cat(rows, axis=0), Tensor(index.astype(np.int32)), 0).reshape(b, length, hidden)
        return self.language_model(embeds, inputs.position_ids, inputs.layout, None, None, None, cache)


class Ovis2_5ForConditionalGeneration(QwenVLForConditionalGeneration):
    """`model` + `lm_head` (or the embedding when tied); the Qwen VL head, cache and dtype handling."""

    model_cls = Ovis2_5Model
    hf_names = HF_NAMES


ENTRY = MindSporeModel(cls=Ovis2_5ForConditionalGeneration, read_config=Ovis2_5Config.from_dict)
