"""`vltune make-tiny`: tiny, random-init, HF-format Qwen VL model directories for tests and the demo.

A directory made here is laid out like a released checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer files with the chat template, preprocessor_config.json and for
Qwen3-VL video_preprocessor_config.json), so every code path that takes a real model directory is
exercised by the tests on something that trains in seconds on a laptop CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .templates import QWEN2_VL_CHAT_TEMPLATE, QWEN3_VL_CHAT_TEMPLATE
from .tokenizer import build_transformers_tokenizer, train_qwen_style_tokenizer

TINY_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# OpenAI CLIP statistics (Qwen2/2.5-VL) and the plain 0.5 of Qwen3-VL's SigLIP-2 tower.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySize:
    """Sizes of a tiny model; the defaults train the demo task on 2 CPU cores in a few minutes."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 352
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 176
    tokenizer_vocab: int = 1024
    tie_word_embeddings: bool = False


def _padded_vocab(n_tokens: int) -> int:
    """Round the embedding up to a multiple of 64 with spare rows, as Qwen's checkpoints do.

    The spare rows matter: MDLM adds `<|mask|>` inside them without resizing the embedding.
    """
    return ((n_tokens + 16 + 63) // 64) * 64


def _token_ids(ids: dict[str, int], size: TinySize) -> dict:
    """Top-level config keys both families share: the vision token ids, from the tokenizer."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": size.tie_word_embeddings,
    }


def _text_sizes(size: TinySize, vocab: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_kv_heads,
    }


def _text_token_ids(ids: dict[str, int], size: TinySize) -> dict:
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": size.tie_word_embeddings,
    }


def _qwen2_5_vl_config(size: TinySize, vocab: int, ids: dict[str, int]) -> dict:
    head_dim = size.text_hidden // size.text_heads
    # The released 3B/7B use mrope_section [16, 24, 24] for head_dim 128: time gets 1/4 of the
    # rotary frequencies, height and width 3/8 each. Keep those proportions.
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope = [t_sec, h_sec, half - t_sec - h_sec]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **_token_ids(ids, size),
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            **_text_sizes(size, vocab),
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            **_text_token_ids(ids, size),
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": size.vision_layers,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "hidden_act": "silu",
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [size.vision_layers - 1],
            "tokens_per_second": 2,
            "out_hidden_size": size.text_hidden,
        },
    }


def _qwen2_vl_config(size: TinySize, vocab: int, ids: dict[str, int]) -> dict:
    """Qwen2-VL: Qwen2.5-VL's text model and M-RoPE, a plain ViT (no windows, LayerNorm, quick-GELU MLP)."""
    config = _qwen2_5_vl_config(size, vocab, ids)
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    config["model_type"] = "qwen2_vl"
    config["text_config"]["model_type"] = "qwen2_vl_text"
    config["vision_config"] = {
        "model_type": "qwen2_vl",
        "depth": size.vision_layers,
        "embed_dim": size.vision_hidden,
        "hidden_size": size.text_hidden,  # the merger's output width
        "mlp_ratio": max(1, size.vision_intermediate // size.vision_hidden),  # an int in Qwen2-VL configs
        "num_heads": size.vision_heads,
        "hidden_act": "quick_gelu",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    return config


def _qwen3_vl_config(size: TinySize, vocab: int, ids: dict[str, int]) -> dict:
    head_dim = size.text_hidden // size.text_heads
    # The released models use an interleaved mrope_section [24, 20, 20] for head_dim 128.
    half = head_dim // 2
    h_sec = (half * 20) // 64
    mrope = [half - 2 * h_sec, h_sec, h_sec]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        **_token_ids(ids, size),
        "text_config": {
            "model_type": "qwen3_vl_text",
            **_text_sizes(size, vocab),
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            **_text_token_ids(ids, size),
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": size.vision_layers,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": size.text_hidden,
            "num_position_embeddings": 64,  # a learned 8x8 grid, interpolated to any image size
            "deepstack_visual_indexes": [0],
        },
    }


def _preprocessor_configs(model_type: str) -> dict[str, dict]:
    """The processor JSON files of the released checkpoints, with their pixel limits."""
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        image = {
            "min_pixels": 56 * 56,
            "max_pixels": 28 * 28 * 1280,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl" else "Qwen2VLProcessor",
        }
        return {"preprocessor_config.json": image}
    image = {
        "size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 1280},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
    }
    video = {  # as Qwen3-VL's released video_preprocessor_config.json (bounds on frames x height x width)
        "size": {"shortest_edge": 4096, "longest_edge": 25165824},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "do_sample_frames": True,
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def make_tiny(
    model_type: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: TinySize | None = None,
    extra_corpus: list[str] | None = None,
) -> Path:
    """Write a tiny random-init HF-format model directory and return its path.

    The same (model_type, seed, size, corpus) always gives the same tokenizer and the same weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"make-tiny: unknown --model-type {model_type!r}; choose one of {', '.join(TINY_MODEL_TYPES)}")
    size = size or TinySize()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    template = QWEN3_VL_CHAT_TEMPLATE if model_type == "qwen3_vl" else QWEN2_VL_CHAT_TEMPLATE
    tokenizer = build_transformers_tokenizer(train_qwen_style_tokenizer(extra_corpus, size.tokenizer_vocab), template)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.get_added_vocab()}
    vocab = _padded_vocab(len(tokenizer))

    build = {"qwen2_vl": _qwen2_vl_config, "qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_vl_config}[model_type]
    config = AutoConfig.for_model(**build(size, vocab, ids))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, content in _preprocessor_configs(model_type).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out
