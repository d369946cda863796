"""data/ against transformers' own processing of the family's tiny directory: the chat template and
token ids (AutoTokenizer), the patches and grids (the family's image processor, PIL backend, bit for
bit) and the placeholder count. The whole AutoProcessor needs torchvision: that part runs where it is
installed (the GPU image)."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.data.dataset import SFTDataset
from vltune.data.formats import load_samples

transformers = pytest.importorskip("transformers")

MAX_PIXELS = 200 * 200


@pytest.fixture(scope="module")
def samples(vqa_data):
    return load_samples(vqa_data["train_file"])[:3]


def test_tokens_and_pixels_equal_transformers(spec, model_dir, samples):
    from PIL import Image

    dataset = SFTDataset(samples, model_dir, max_length=4096, max_pixels=MAX_PIXELS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil", max_pixels=MAX_PIXELS)
    assert type(image_processor).__name__.startswith(spec.media.image_processor)
    merge = image_processor.merge_size
    for i, sample in enumerate(samples):
        ours = dataset[i]
        theirs = image_processor(images=[Image.open(p) for p in sample.images], return_tensors="np")
        assert np.array_equal(theirs["image_grid_thw"], ours.image_grid_thw)
        assert np.array_equal(theirs["pixel_values"], ours.pixel_values)
        # A family whose recipe trains with its own template (Ovis2.5) is rendered with that one
        text = tokenizer.apply_chat_template(sample.messages, tokenize=False, chat_template=spec.training_chat_template)
        assert text == dataset.tokenizer.render(sample.messages)
        opening, pad, closing = spec.media.image_tokens
        for grid in theirs["image_grid_thw"]:  # the processor's expansion: one pad per merged patch (+ indicators)
            text = text.replace(spec.media.image_tag, opening + "<|placeholder|>" * (int(np.prod(grid)) // merge**2) + closing, 1)
        expected = tokenizer(text.replace("<|placeholder|>", pad), add_special_tokens=False)["input_ids"]
        assert ours.input_ids.tolist() == expected


def test_auto_processor_equals_the_pipeline(model_dir, samples):
    pytest.importorskip("torchvision", reason="transformers' Qwen VL processors need torchvision")
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(model_dir, max_pixels=MAX_PIXELS)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil", max_pixels=MAX_PIXELS)
    dataset = SFTDataset(samples, model_dir, max_length=4096, max_pixels=MAX_PIXELS)
    for i, sample in enumerate(samples):
        text = processor.apply_chat_template(sample.messages, tokenize=False)
        theirs = processor(text=[text], images=[Image.open(p) for p in sample.images], return_tensors="np")
        ours = dataset[i]
        assert theirs["input_ids"][0].tolist() == ours.input_ids.tolist()
        assert np.array_equal(theirs["pixel_values"], ours.pixel_values)
