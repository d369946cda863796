"""Circle-RoPE + AGE on the stock transformers models: per-layer cos/sin, decoding, positions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.batch import to_tensor  # noqa: E402
from vltune.backends.torch.generate import generate_with_positions  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.models.circle_rope import CircleRopeAdapter  # noqa: E402
from vltune.core.circle_rope import per_token_distance  # noqa: E402
from vltune.core.config import CIRCLE_ROPE_DEFAULTS, ConfigError, ModelArgs  # noqa: E402
from vltune.core.recipe_rules import circle_rope_settings  # noqa: E402
from vltune.core.families import attention_layer_indices, family_names  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402

STRATEGY_4 = {**CIRCLE_ROPE_DEFAULTS, "AGE_mode": "strategy_4"}


def _dataset(model_dir, vqa_data, n=3):
    return SFTDataset(load_samples(vqa_data["eval_file"])[:n], model_dir, max_length=512, max_pixels=12544)


CIRCLE_FAMILIES = family_names("circle_rope")  # every family that offers Circle-RoPE: a new one is covered


@pytest.fixture(scope="module")
def four_layer_dirs(tmp_path_factory) -> dict:
    """AGE needs several decoder layers to show alternation (the default tiny model has 2)."""
    from vltune.backends.torch.tiny import TinySize, make_tiny

    root = tmp_path_factory.mktemp("tiny4")
    return {mt: make_tiny(mt, root / mt, size=TinySize(text_layers=4)) for mt in CIRCLE_FAMILIES}


@pytest.mark.parametrize("model_type", CIRCLE_FAMILIES)
def test_strategy_4_gives_even_layers_circle_and_odd_layers_mrope(four_layer_dirs, vqa_data, model_type):
    path = four_layer_dirs[model_type]
    model = load_model(path)
    dataset = _dataset(path, vqa_data)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, STRATEGY_4)([dataset[i] for i in range(3)])
    assert batch["position_ids"].dtype == np.float64 and "position_ids_alt" in batch
    adapter = CircleRopeAdapter(model, STRATEGY_4)
    # AGE counts the layers with rotary positions: all four, or a hybrid model's attention layers (1 and 3)
    text_config = model.model.language_model.config
    rotary_layers = attention_layer_indices(getattr(text_config, "layer_types", None), 4)
    assert adapter.layer_mask == [True, False, True, False][: len(rotary_layers)]

    seen = {}
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, kwargs["position_embeddings"][0].detach().clone()),
            with_kwargs=True,
        )
    rotary = model.model.language_model.rotary_emb
    dummy = torch.zeros(1, dtype=torch.float32)
    circle_cos = rotary(dummy, to_tensor(batch["position_ids"], "cpu", torch.long))[0]
    mrope_cos = rotary(dummy, to_tensor(batch["position_ids_alt"], "cpu", torch.long))[0]
    assert not torch.allclose(circle_cos, mrope_cos), "the two position sets must differ for this test to mean anything"
    with torch.no_grad(), adapter.alt_positions(to_tensor(batch["position_ids_alt"], "cpu", torch.long)):
        model(**{k: to_tensor(batch[k], "cpu", d) for k, d in
                 [("input_ids", torch.long), ("attention_mask", torch.long), ("position_ids", torch.long),
                  ("pixel_values", torch.float32), ("image_grid_thw", torch.long)]})
    for k, i in enumerate(rotary_layers):
        expected = circle_cos if k % 2 == 0 else mrope_cos
        assert torch.equal(seen[i], expected), f"layer {i}"


def test_missing_alt_positions_is_a_clear_error(tiny_qwen2_5_vl, vqa_data):
    model = load_model(tiny_qwen2_5_vl)
    dataset = _dataset(tiny_qwen2_5_vl, vqa_data, 1)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, STRATEGY_4)([dataset[0]])
    CircleRopeAdapter(model, STRATEGY_4)
    with pytest.raises(RuntimeError, match="position_ids_alt"):
        model(input_ids=to_tensor(batch["input_ids"], "cpu", torch.long),
              position_ids=to_tensor(batch["position_ids"], "cpu", torch.long),
              pixel_values=to_tensor(batch["pixel_values"], "cpu", torch.float32),
              image_grid_thw=to_tensor(batch["image_grid_thw"], "cpu", torch.long))


@pytest.mark.parametrize("model_type", CIRCLE_FAMILIES)
def test_kv_cache_generation_equals_full_recompute(four_layer_dirs, vqa_data, model_type):
    """Image followed by text, left-padded batch of 3, AGE strategy_4: cached == uncached, token for token."""
    path = four_layer_dirs[model_type]
    model = load_model(path)
    model.generation_config.eos_token_id = [model.config.text_config.vocab_size - 1]  # run all steps
    dataset = _dataset(path, vqa_data)
    prompts = [dataset.prompt(i)[0] for i in range(3)]
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, STRATEGY_4)(prompts, padding_side="left")
    adapter = CircleRopeAdapter(model, STRATEGY_4)
    cached = generate_with_positions(model, batch, 12, adapter, use_cache=True)
    full = generate_with_positions(model, batch, 12, adapter, use_cache=False)
    assert cached == full and all(len(row) == 12 for row in cached)


def test_decode_positions_continue_both_position_sets(tiny_qwen2_5_vl, vqa_data):
    """A generated token sits where rope2d puts the same token if it were part of the prompt."""
    dataset = _dataset(tiny_qwen2_5_vl, vqa_data, 1)
    collate = Collator(dataset.info, dataset.tokenizer.pad_token_id, STRATEGY_4)
    prompt, _ = dataset.prompt(0)
    base = collate([prompt], padding_side="left")
    longer = prompt.__class__(**{**prompt.__dict__, "input_ids": np.concatenate([prompt.input_ids, [5, 6, 7]]),
                                "labels": np.full(len(prompt.input_ids) + 3, -100)})
    extended = collate([longer], padding_side="left")
    for key in ("position_ids", "position_ids_alt"):
        nxt = base[key][:, 0].max() + 1
        assert np.allclose(extended[key][:, 0, -3:], nxt + np.arange(3)), key
    # Circle ids are fractional after an image, M-RoPE ids are integers: the two deltas differ.
    assert base["rope_deltas"][0, 0] != base["rope_deltas_alt"][0, 0]


def test_circle_positions_in_a_batch_are_equidistant_from_text(tiny_qwen2_5_vl, vqa_data):
    dataset = _dataset(tiny_qwen2_5_vl, vqa_data, 1)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, STRATEGY_4)([dataset[0]])
    pos = batch["position_ids"][:, 0].T  # [L, 3]
    is_image = batch["input_ids"][0] == dataset.info.image_token_id
    assert per_token_distance(pos[~is_image], pos[is_image]) < 1e-6
    alt = batch["position_ids_alt"][:, 0].T
    assert per_token_distance(alt[~is_image], alt[is_image]) > 0.1


def test_circle_rope_settings_from_the_recipe():
    assert circle_rope_settings(ModelArgs(model_type=None), "qwen2_5_vl") is None
    settings = circle_rope_settings(ModelArgs(model_type="qwen2_5_vl_circle_rope"), "qwen2_5_vl")
    assert settings == CIRCLE_ROPE_DEFAULTS
    custom = circle_rope_settings(ModelArgs(model_type="qwen3_vl_circle_rope", circle_rope={"radius": "auto-2", "AGE_mode": None}), "qwen3_vl")
    assert custom["radius"] == "auto-2" and custom["AGE_mode"] == "strategy_1"
    with pytest.raises(ConfigError, match="does not fit the model directory"):
        circle_rope_settings(ModelArgs(model_type="qwen3_vl_circle_rope"), "qwen2_5_vl")
    with pytest.raises(ConfigError, match="circle_rope is set but model_type"):
        circle_rope_settings(ModelArgs(circle_rope={"alpha": 1.0}), "qwen2_5_vl")
    with pytest.raises(ConfigError, match="radius"):
        circle_rope_settings(ModelArgs(model_type="qwen2_5_vl_circle_rope", circle_rope={"radius": "big"}), "qwen2_5_vl")
