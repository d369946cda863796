"""Recipes: bundled ones load, overrides are typed, every problem is reported at once."""

from __future__ import annotations

import pytest

from vltune.core.config import RECIPE_DIR, ConfigError
from vltune.core.recipe import load_recipe


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


def test_family_capabilities_are_checked_before_a_model_loads():
    """A recipe that asks a family for what it cannot do fails at load time, naming the families that can."""
    from vltune.core.config import ConfigError
    from vltune.core.recipe_rules import check_family
    from vltune.core.families import family_names, get_family

    # every family has a MindSpore model now: the check is shown with MDLM, which some families lack
    no_mdlm = [name for name in family_names() if name not in family_names("mdlm")]
    assert no_mdlm, "some family lacks MDLM (else this test has nothing to refuse)"
    base = {"model_name_or_path": "m", "dataset_use": "d.jsonl"}
    with pytest.raises(ConfigError, match=f"objective: mdlm: vltune does not support it for {no_mdlm[0]}") as e:
        load_recipe({**base, "model_type": no_mdlm[0], "objective": "mdlm"})
    assert all(name in str(e.value) for name in family_names("mdlm"))
    with pytest.raises(ConfigError, match="make_tiny_model: 'llava' is not one of"):
        load_recipe({**base, "make_tiny_model": "llava"})
    with pytest.raises(ConfigError, match="model_type: 'llava_circle_rope' is not a supported family"):
        load_recipe({**base, "model_type": "llava_circle_rope"})
    cfg = load_recipe({**base, "objective": "mdlm"})  # family unknown until config.json is read
    with pytest.raises(ConfigError, match=f"invalid recipe for a {no_mdlm[0]} model"):
        check_family(cfg, get_family(no_mdlm[0]))


def test_tiny_model_follows_model_type():
    cfg = load_recipe("demo", {"model_type": "qwen3_vl"})
    assert cfg.model.make_tiny_model == "qwen3_vl" and cfg.model.model_name_or_path.endswith("tiny-qwen3_vl")
    same = load_recipe("demo", {"model_type": "qwen2_5_vl_circle_rope"})
    assert same.model.make_tiny_model == "qwen2_5_vl" and same.model.model_name_or_path.endswith("tiny-qwen2_5_vl")
