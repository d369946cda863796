"""Recipes: bundled ones load, overrides are typed, every problem is reported at once."""

from __future__ import annotations

import pytest

from vltune.core.config import RECIPE_DIR, ConfigError, load_recipe


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_every_bundled_recipe_loads(recipe):
    cfg = load_recipe(recipe)
    assert cfg.model.model_name_or_path and cfg.data.dataset_use


def test_command_line_strings_are_coerced_to_declared_types():
    cfg = load_recipe("demo", {"max_steps": "20", "learning_rate": "3e-4", "bf16": "true", "eval_dataset": "none",
                               "synthetic_vqa": "{out_dir: x, num_train: 8}"})
    assert cfg.train.max_steps == 20 and cfg.train.learning_rate == 3e-4 and cfg.train.bf16 is True
    assert cfg.data.eval_dataset is None
    assert cfg.data.synthetic_vqa == {"out_dir": "x", "num_train": 8}


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_recipe("demo", {"learning_rat": "1e-4"})


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", {"max_steps": "abc", "lr_scheduler_type": "wavy", "per_device_train_batch_size": "0"})
    assert "max_steps: 'abc' is not a valid int" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", {"lr_scheduler_type": "wavy", "per_device_train_batch_size": "0", "backend": "jax"})
    message = str(err.value)
    for fragment in ("lr_scheduler_type: 'wavy'", "per_device_train_batch_size: 0", "backend: 'jax'"):
        assert fragment in message


def test_missing_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_data_loader_settings():
    cfg = load_recipe("demo", {"dataloader_num_workers": "4", "dataloader_prefetch": "0"})
    assert cfg.data.dataloader_num_workers == 4 and cfg.data.dataloader_prefetch == 0
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", {"dataloader_num_workers": "-1", "dataloader_prefetch": "-2"})
    assert "dataloader_num_workers: -1 must be >= 0" in str(err.value) and "dataloader_prefetch: -2 must be >= 0" in str(err.value)
