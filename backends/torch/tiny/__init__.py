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

from vltune.core.families import DEFAULT_FAMILY, FamilySpec, ModelShape, TokenIds, get_family

from .tokenizer import build_transformers_tokenizer, train_qwen_style_tokenizer


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


def tiny_shape(spec: FamilySpec, size: TinySize, vocab: int) -> ModelShape:
    """The family's tiny ModelShape at these sizes."""
    return spec.tiny_shape(
        text_hidden=size.text_hidden, text_layers=size.text_layers, text_heads=size.text_heads,
        text_kv_heads=size.text_kv_heads, text_intermediate=size.text_intermediate, vision_hidden=size.vision_hidden,
        vision_layers=size.vision_layers, vision_heads=size.vision_heads, vision_intermediate=size.vision_intermediate,
        vocab=vocab, tie_word_embeddings=size.tie_word_embeddings,
    )


def token_ids(ids: dict[str, int], spec: FamilySpec | None = None) -> TokenIds:
    """The config.json token ids from the tokenizer's added tokens (by the family's media tokens)."""
    return (spec or get_family(DEFAULT_FAMILY)).token_ids(ids)


def _add_untrained(out: Path, prefixes: tuple[str, ...], hidden: int, seed: int) -> None:
    """Tensors a released checkpoint carries but transformers does not load (Qwen3.5's `mtp.*` head), added
    to model.safetensors as the releases ship them, so that saving is tested to keep them."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed + 1)
    for prefix in prefixes:
        weights[f"{prefix}fc.weight"] = torch.randn(hidden, 2 * hidden, generator=generator)
        weights[f"{prefix}norm.weight"] = torch.randn(hidden, generator=generator)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


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

    spec = get_family(model_type, "make-tiny --model-type")
    size = size or TinySize()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory: give make-tiny a new directory to write the model to")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_transformers_tokenizer(train_qwen_style_tokenizer(extra_corpus, size.tokenizer_vocab), spec.chat_template,
                                             spec.media)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.get_added_vocab()}
    vocab = _padded_vocab(len(tokenizer))

    config = AutoConfig.for_model(**spec.config_json(tiny_shape(spec, size, vocab), token_ids(ids, spec)))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    if spec.untrained_prefixes:
        _add_untrained(out, spec.untrained_prefixes, config.get_text_config().hidden_size, seed)
    tokenizer.save_pretrained(out)
    for name, content in spec.tiny_processor_configs().items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out
