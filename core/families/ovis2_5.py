"""Ovis2.5 (AIDC-AI; transformers `ovis2_5`): a SigLIP2-NaViT tower, a visual tokenizer and a Qwen3 LLM.

What differs from the Qwen VL line, all of it data here:

* The tower (patch 16, a learned 2-D position grid interpolated bicubically, 2-D rotary, optional window
  layers; every released layer is full attention) keeps one feature per patch. The visual tokenizer
  merges 2 x 2 patches, maps each merged token to a softmax over a 65,532-entry visual vocabulary
  (linear + LayerNorm), and the visual embedding table (65,536 x hidden, the last 4 rows indicator
  embeddings) turns those probabilities into the LLM's input embeddings. Both are the projector.
* An image is written `<image>` by the template and expands to `<ovis_image_start>` + one pad per merged
  patch + `<ovis_image_end>` (a video the same with its own start/end); the start/end tokens' embeddings
  are replaced by the indicator rows. The pads are `<|image_pad|>` / `<|video_pad|>`, the ids transformers'
  Ovis2_5Config carries by default; the indicator tokens are added after Qwen3's vocabulary.
* Positions are 1-D (Qwen3's rotary): media tokens count like text.
* The Ovis recipe trains answers with their reasoning whole and shows an answer without reasoning after
  an empty think block that is not trained (its Qwen3ConversationFormatter), and does not train the
  newline after `<|im_end|>`: `training_chat_template`, `trains_turn_newline`.
* `train_modules` (the Ovis recipe's key) names its modules: llm, visual_tokenizer (tower + head),
  visual_tokenizer.vit, visual_tokenizer.head, visual_tokenizer.vit.last_block, vte, all.
"""

from __future__ import annotations

from dataclasses import replace

from .chat_templates import OVIS2_5_CHAT_TEMPLATE, OVIS2_5_TRAINING_TEMPLATE
from .spec import Capabilities, FamilySpec, MediaRule, ModelInfo, ModelShape, ModuleMap, PositionRule, TokenIds

IMAGENET_STANDARD = [0.5, 0.5, 0.5]
INDICATOR_TOKENS = ("<ovis_visual_atom>", "<ovis_image_start>", "<ovis_image_end>", "<ovis_video_start>", "<ovis_video_end>")
"""The tokens transformers' converter adds after Qwen3's vocabulary, in its order (151669 ... 151673)."""

MIN_PIXELS = 448 * 448
MAX_PIXELS = {2048: 1344 * 1792, 4096: 1792 * 1792}
"""The released processors' pixel bounds: the 2B's (LLM width 2048) and the 9B's (4096)."""


def _released(name: str, hidden: int, intermediate: int, layers: int, heads: int, tie: bool) -> ModelShape:
    """A released shape: its Qwen3 LLM and the shared SigLIP2-so400m tower (27 x 1152, 512 px grid)."""
    return ModelShape(name, "ovis2_5", hidden, intermediate, layers, heads, 8, 151936, tie, 1152, 4304, 27, 16,
                      patch_size=16, head_dim=128, num_position_embeddings=1024, max_position_embeddings=40960,
                      temporal_patch=1, visual_vocab=65536)


class Ovis2_5(FamilySpec):
    name = "ovis2_5"
    architecture = "Ovis2_5ForConditionalGeneration"
    chat_template = OVIS2_5_CHAT_TEMPLATE
    training_chat_template = OVIS2_5_TRAINING_TEMPLATE
    trains_turn_newline = False
    position = PositionRule(video_time="frame_index", rotary="text")
    media = MediaRule(
        image_processor="Ovis2_5ImageProcessor", video_processor="Ovis2_5VideoProcessor", processor_class="Ovis2_5Processor",
        image_tag="<image>", video_tag="<video>",
        image_tokens=("<ovis_image_start>", "<|image_pad|>", "<ovis_image_end>"),
        video_tokens=("<ovis_video_start>", "<|video_pad|>", "<ovis_video_end>"),
        span_open=("<ovis_image_start>", "<ovis_video_start>"), span_close=("<ovis_image_end>", "<ovis_video_end>"),
        added_tokens=INDICATOR_TOKENS,
    )
    modules = ModuleMap(
        vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.layers",
        projectors=("model.multi_modal_projector",),
        vision_attention="self_attn",
        unreached=("model.vision_tower.post_layernorm",),
    )
    capabilities = Capabilities(mdlm=False, circle_rope=False, liger=False)
    capability_reasons = {
        "mdlm": "vltune's MDLM objective is built on the Qwen VL models' 3D M-RoPE batches; Ovis2.5 is not wired into it",
        "circle_rope": "Circle-RoPE places media on M-RoPE's three position axes; Ovis2.5's language model has 1-D positions",
        "liger": "vltune's Liger binding patches the Qwen VL modeling files, not Ovis2.5's",
    }
    vision_mlp_matrices = 2  # fc1, fc2 (GELU)
    train_module_aliases = {
        "all": ("",),
        "llm": ("model.language_model", "lm_head"),
        "visual_tokenizer": ("model.vision_tower", "model.multi_modal_projector.visual_tokenizer"),
        "visual_tokenizer.vit": ("model.vision_tower",),
        "visual_tokenizer.head": ("model.multi_modal_projector.visual_tokenizer",),
        "visual_tokenizer.vit.last_block": ("model.vision_tower.layers.-1",),
        "vte": ("model.multi_modal_projector.visual_embeddings_table",),
    }
    # <|endoftext|> 151643, <|im_end|> 151645, <|image_pad|> 151655, <|video_pad|> 151656, <ovis_image_start> 151670 ...
    released_token_ids = TokenIds(image=151655, video=151656, vision_start=151670, vision_end=151671, bos=151643,
                                  eos=151645, pad=151643, video_start=151672, video_end=151673)
    shapes = {
        s.name: s
        for s in (
            _released("ovis2_5-2b", 2048, 6144, 28, 16, tie=True),
            _released("ovis2_5-9b", 4096, 12288, 36, 32, tie=False),
        )
    }

    # -- config.json -> what vltune needs -----------------------------------------------------

    def info(self, config: dict) -> ModelInfo:
        vision, text = config.get("vision_config", {}), self.text_section(config)
        return ModelInfo(
            model_type=self.name,
            image_token_id=config.get("image_token_id", 151655),
            video_token_id=config.get("video_token_id", 151656),
            vision_start_token_id=config.get("image_start_token_id", 151670),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            tokens_per_second=2,
            num_hidden_layers=text["num_hidden_layers"],
            rotary_layers=text["num_hidden_layers"],
        )

    def shape(self, config: dict) -> ModelShape:
        text, vision = self.text_section(config), config["vision_config"]
        heads = text["num_attention_heads"]
        image_grid = vision.get("image_size", 512) // vision.get("patch_size", 16)
        layer_types = vision.get("layer_types") or ()
        window_layers = tuple(i for i, kind in enumerate(layer_types) if kind != "full_attention")
        return ModelShape(
            name=self.name, model_type=self.name, hidden=text["hidden_size"], intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"], heads=heads, kv_heads=text.get("num_key_value_heads", heads),
            vocab=text["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_hidden=vision["hidden_size"], vision_intermediate=vision["intermediate_size"],
            vision_depth=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
            patch_size=vision.get("patch_size", 16), merge_size=vision.get("spatial_merge_size", 2),
            window_size=vision.get("window_size", 112),
            # core/flops.py reads `fullatt_blocks` as "windowed tower, these layers full"; all-full towers leave it empty
            fullatt_blocks=tuple(i for i in range(vision["num_hidden_layers"]) if i not in window_layers) if window_layers else (),
            head_dim=text.get("head_dim"), num_position_embeddings=image_grid * image_grid,
            max_position_embeddings=text.get("max_position_embeddings", 40960),
            temporal_patch=vision.get("temporal_patch_size", 1), visual_vocab=vision.get("vocab_size", 65536),
        )

    # -- FLOPs -----------------------------------------------------------------------------------

    def merger_params(self, shape: ModelShape) -> int:
        """The visual tokenizer's head (merged patch -> visual-vocabulary logits) and the visual embedding
        table, a dense [visual vocab x hidden] product of the softmax: per merged token."""
        merged = shape.vision_hidden * shape.merge_size**2
        return merged * (shape.visual_vocab - 4) + shape.visual_vocab * shape.hidden

    # -- ModelShape -> config.json ---------------------------------------------------------------

    def text_config(self, shape: ModelShape, ids: TokenIds) -> dict:
        config = super().text_config(shape, ids)
        config.update({"model_type": "qwen3", "head_dim": shape.text_head_dim, "hidden_act": "silu",
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}})
        return config

    def vision_config(self, shape: ModelShape) -> dict:
        return {
            "model_type": "ovis2_5_vision",
            "hidden_size": shape.vision_hidden,
            "intermediate_size": shape.vision_intermediate,
            "num_hidden_layers": shape.vision_depth,
            "num_attention_heads": shape.vision_heads,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": shape.patch_size,
            "spatial_merge_size": shape.merge_size,
            "temporal_patch_size": shape.temporal_patch,
            "image_size": int(shape.num_position_embeddings**0.5) * shape.patch_size,
            "window_size": shape.window_size,
            "layer_types": ["full_attention"] * shape.vision_depth,
            "vocab_size": shape.visual_vocab,
            "num_visual_indicator_tokens": 4,
        }

    def config_json(self, shape: ModelShape, ids: TokenIds) -> dict:
        """Qwen's layout with the indicator tokens' ids in place of <|vision_start|> / <|vision_end|>."""
        config = super().config_json(shape, ids)
        del config["vision_start_token_id"], config["vision_end_token_id"]
        return {**config, "image_start_token_id": ids.vision_start, "image_end_token_id": ids.vision_end,
                "video_start_token_id": ids.video_start, "video_end_token_id": ids.video_end}

    def _processor_files(self, min_pixels: int, max_pixels: int) -> dict[str, dict]:
        common = {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "patch_size": 16,
                  "temporal_patch_size": 1, "merge_size": 2, "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD,
                  "resample": 2, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "do_convert_rgb": True, "processor_class": self.media.processor_class}
        return {"preprocessor_config.json": {**common, "image_processor_type": self.media.image_processor},
                "video_preprocessor_config.json": {**common, "do_sample_frames": False,
                                                   "video_processor_type": self.media.video_processor}}

    def processor_configs(self) -> dict[str, dict]:
        """The 2B's files (transformers' converter writes 1344 x 1792 as its pixel maximum, 1792 x 1792 for the 9B)."""
        return self._processor_files(MIN_PIXELS, MAX_PIXELS[2048])

    def tiny_processor_configs(self) -> dict[str, dict]:
        """Small bounds, as transformers' own Ovis2.5 processor tests use: the released 448 x 448 minimum
        would make every tiny test image 784 patches."""
        return self._processor_files(64 * 64, 64 * 1024)

    def tiny_shape(self, **sizes) -> ModelShape:
        """An 8 x 8 learned position grid (128 px at patch 16), a 256-entry visual vocabulary."""
        shape = super().tiny_shape(**sizes)
        return replace(shape, patch_size=16, num_position_embeddings=64, head_dim=shape.hidden // shape.heads,
                       temporal_patch=1, visual_vocab=256, max_position_embeddings=4096)


SPEC = Ovis2_5()
