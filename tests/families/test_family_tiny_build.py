"""Tiny build: the directory is a complete HF model of the family, loaded by transformers' auto class."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")


def test_tiny_directory_is_a_released_layout(model_dir, spec):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == spec.name and config["architectures"] == [spec.architecture]
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", *spec.processor_configs()):
        assert (model_dir / name).exists(), name


def test_loads_as_its_architecture_with_auto_classes(model_dir, spec, torch_model):
    import transformers

    auto = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
    assert type(auto).__name__ == type(torch_model).__name__ == spec.architecture
    info = spec.info(json.loads((model_dir / "config.json").read_text()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert info.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert info.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
