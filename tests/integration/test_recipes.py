"""Every bundled recipe starts and runs 2 steps on a tiny model on CPU (model and data swapped in): the tiny
model of the family the recipe's name starts with, else Qwen2.5-VL's."""

from __future__ import annotations

import pytest

from vltune.core.config import RECIPE_DIR

pytest.importorskip("torch")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_bundled_recipe_runs_two_steps(recipe, tmp_path, tiny_models, vqa_data):
    from vltune.core.families import FAMILIES
    from vltune.training import train

    family = next((f for f in sorted(FAMILIES, key=len, reverse=True) if recipe.startswith(f + "_")), "qwen2_5_vl")
    summary = train(recipe, {
        "model_name_or_path": str(tiny_models[family]), "make_tiny_model": None, "synthetic_vqa": None,
        "dataset_use": vqa_data["train_file"], "eval_dataset": vqa_data["eval_file"], "num_eval_samples": 4,
        "max_steps": 2, "eval_steps": 0, "save_steps": 1, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "output_dir": str(tmp_path / "out"), "max_pixels": 12544,
        "min_pixels": 3136, "model_max_length": 512, "early_stopping_patience": 0,
        # Compiled blocks train as eager ones do (test_speed_options.py); compiling them here in bf16 on
        # the CPU would cost ~3 minutes of the suite for the same check of this recipe's other keys.
        "torch_compile": False,
    }, show_progress=False)
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").exists()
    expected = "adapter_config.json" if summary["train_type"] == "lora" else "model.safetensors"
    assert (tmp_path / "out" / expected).exists()
