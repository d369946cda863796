"""The tiny model directories load in plain transformers and render/tokenise like the real Qwen ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from vltune.backends.torch.tiny.tokenizer import QWEN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS  # noqa: E402
from vltune.data.chat import ChatTokenizer  # noqa: E402

MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat color is the assistant's star?"}]},
    {"role": "assistant", "content": "red"},
]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loads_with_auto_classes(tiny_model_dirs, model_type):
    path = tiny_model_dirs[model_type]
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type == model_type
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 3_000_000, f"tiny model has {n_params} parameters"
    assert model.config.text_config.vocab_size % 64 == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert model.config.text_config.vocab_size >= len(tokenizer) + 16, "spare embedding rows for <|mask|>"
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    assert image_processor.merge_size == 2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_special_tokens_and_chat_template(tiny_model_dirs, model_type):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dirs[model_type])
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS]
    # Consecutive ids right after the BPE vocabulary, in Qwen's order.
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for token in ("<|im_start|>", "<think>", "</think>", "<|video_pad|>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat color" in text
    assert text.endswith("<|im_start|>assistant\nred<|im_end|>\n")
    has_default_system = model_type == "qwen2_5_vl"
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") == has_default_system
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_vltune_chat_tokenizer_matches_transformers(tiny_model_dirs, model_type):
    """data/ renders and tokenises without transformers; the result must be the tokenizer's own."""
    path = tiny_model_dirs[model_type]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ours = ChatTokenizer(path)
    for add_generation_prompt, messages in ((False, CONVERSATION), (True, CONVERSATION[:1])):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.render(messages, add_generation_prompt=add_generation_prompt) == text
    n_tokens = 7
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False).replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids, labels = ours.encode_chat(CONVERSATION, [ours.image_placeholder(n_tokens)])
    assert input_ids.tolist() == expected
    trained = input_ids[labels != -100]
    assert ours.decode(trained, skip_special_tokens=False) == "red<|im_end|>\n"


def test_auto_processor_output_equals_the_vltune_pipeline(tiny_model_dirs, vqa_data):
    """AutoProcessor (where it can be built) and data/ give the same ids, patches and grids.

    transformers 5.x builds Qwen VL processors only with torchvision (its video processor needs
    it); PyPI has no torchvision that runs with the CPU torch wheel, so this runs on the GPU image.
    """
    pytest.importorskip("torchvision", reason="transformers' Qwen VL video processor needs torchvision")
    from PIL import Image

    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    samples = load_samples(vqa_data["train_file"])[:3]
    for model_type, path in tiny_model_dirs.items():
        processor = transformers.AutoProcessor.from_pretrained(path, max_pixels=200 * 200)
        dataset = SFTDataset(samples, path, max_length=4096, max_pixels=200 * 200)
        for i, sample in enumerate(samples):
            text = processor.apply_chat_template(sample.messages, tokenize=False)
            assert text == dataset.tokenizer.render(sample.messages), model_type
            images = [Image.open(p) for p in sample.images]
            theirs = processor(text=[text], images=images, return_tensors="np")
            ours = dataset[i]
            assert theirs["input_ids"][0].tolist() == ours.input_ids.tolist(), model_type
            assert np.array_equal(theirs["image_grid_thw"], ours.image_grid_thw), model_type
            if "Pil" in type(processor.image_processor).__name__:
                assert np.array_equal(theirs["pixel_values"], ours.pixel_values), model_type
            else:
                # With torchvision installed transformers defaults to its torchvision backend, whose
                # bicubic resize rounds differently from PIL's (vltune matches the PIL backend bit for
                # bit: test_vision.py). The gap is a few uint8 levels on resized images only.
                diff = np.abs(theirs["pixel_values"] - ours.pixel_values)
                level = (1 / 255) / min(dataset.vision.image_std)
                assert diff.max() <= 8 * level and diff.mean() <= 0.5 * level, (model_type, diff.max(), diff.mean())


def test_make_tiny_is_deterministic(tmp_path, tiny_qwen2_5_vl):
    from safetensors.numpy import load_file

    from vltune.backends.torch.tiny import make_tiny

    again = make_tiny("qwen2_5_vl", tmp_path / "again", seed=0)
    a, b = load_file(tiny_qwen2_5_vl / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((again / "tokenizer.json").read_text()) == json.loads((tiny_qwen2_5_vl / "tokenizer.json").read_text())


def test_make_tiny_rejects_unknown_type(tmp_path):
    from vltune.backends.torch.tiny import make_tiny

    with pytest.raises(ValueError, match="make-tiny --model-type: 'llava' is not a model family"):
        make_tiny("llava", tmp_path)
