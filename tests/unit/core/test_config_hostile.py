"""Recipes a careless or hostile user writes: each is refused at load time, naming the key and the fix."""

from __future__ import annotations

import pytest

from vltune.core.config import ConfigError, ModelArgs
from vltune.core.recipe import load_recipe
from vltune.core.recipe_rules import circle_rope_settings

BASE = {"model_name_or_path": "m", "dataset_use": "x.jsonl"}


def _problem(overrides: dict, recipe: dict | str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_recipe(dict(BASE) if recipe is None else recipe, overrides)
    return str(caught.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_floats_are_refused_for_every_float_key(value):
    for key in ("learning_rate", "vision_tower_lr", "max_grad_norm", "adam_epsilon", "warmup_ratio", "lora_alpha", "mdlm_eps"):
        message = _problem({key: value})
        assert f"{key}: " in message and "not a finite number" in message


def test_all_non_finite_keys_are_named_in_one_error():
    message = _problem({"learning_rate": "nan", "weight_decay": "inf", "warmup_ratio": "nan"})
    assert "learning_rate" in message and "weight_decay" in message
    assert message.count("warmup_ratio") == 1  # once, as non-finite: not again as out of [0, 1)


@pytest.mark.parametrize(("key", "value"), [
    ("eval_max_new_tokens", 0), ("eval_max_new_tokens", -3), ("max_pixels", 0), ("min_pixels", -1),
    ("video_max_pixels", 0), ("video_max_frames", 0), ("num_eval_samples", 0), ("eval_steps", -1),
    ("warmup_steps", -1), ("num_threads", -2), ("base_interval", 0),
])
def test_counts_that_must_be_positive_are_checked_up_front(key, value):
    assert f"{key}: {value}" in _problem({key: value})


def test_min_pixels_above_max_pixels_is_refused():
    message = _problem({"min_pixels": 5000, "max_pixels": 4000})
    assert "min_pixels 5000 > max_pixels 4000" in message


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    message = _problem({"output_dir": str(tmp_path / "taken")})
    assert "output_dir" in message and "is a file" in message


def test_yaml_syntax_error_names_the_recipe_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_use: x.jsonl\n  max_steps: 1\n")
    message = _problem({}, str(recipe))
    assert f"{recipe}, line 3" in message and "<unicode string>" not in message


def test_folder_as_recipe_is_refused(tmp_path):
    message = _problem({}, str(tmp_path))
    assert "is a directory" in message and "YAML" in message


def test_ambiguous_unknown_key_suggests_the_train_key():
    message = _problem({"per_device_batch_size": 4})
    assert "did you mean 'per_device_train_batch_size'" in message


def test_circle_rope_numbers_given_as_strings_are_accepted():
    model = ModelArgs(model_type="qwen2_5_vl_circle_rope",
                      circle_rope={"move_to_positive": "2", "alpha": "0.25", "radius": "12", "dff_rate": "0.5"})
    settings = circle_rope_settings(model, "qwen2_5_vl")
    assert (settings["move_to_positive"], settings["alpha"], settings["radius"], settings["dff_rate"]) == (2.0, 0.25, 12.0, 0.5)
    auto = circle_rope_settings(ModelArgs(model_type="qwen2_5_vl_circle_rope", circle_rope={"radius": "auto-2"}), "qwen2_5_vl")
    assert auto["radius"] == "auto-2"
    with pytest.raises(ConfigError, match="move_to_positive"):
        circle_rope_settings(ModelArgs(model_type="qwen2_5_vl_circle_rope", circle_rope={"move_to_positive": "two"}), "qwen2_5_vl")


def test_liger_kernel_without_the_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    assert "pip install liger-kernel" in _problem({"use_liger_kernel": True})
