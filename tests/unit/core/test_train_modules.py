"""train_modules (core/train_modules.py) and the recipe key aliases (config.KEY_ALIASES): parsing, names,
conflicts, and messages that name the key as the recipe wrote it."""

from __future__ import annotations

import pytest

from vltune.core import train_modules as tm
from vltune.core.checkpointing import TRAJECTORY_KEYS
from vltune.core.config import KEY_ALIASES, SECTIONS, ConfigError
from vltune.core.families import get_family
from vltune.core.recipe import load_recipe
from vltune.core.recipe_keys import find, recipe_keys, render_markdown

BASE = {"model_name_or_path": "m", "dataset_use": "d.jsonl"}
OVIS = get_family("ovis2_5").train_modules_table
QWEN = get_family("qwen2_5_vl").train_modules_table


def test_parse():
    assert tm.parse("llm|vte:1e-5") == [tm.TrainModule("llm"), tm.TrainModule("vte", 1e-5)]
    assert tm.parse(" visual_tokenizer.head : 2e-5 | llm ") == [tm.TrainModule("visual_tokenizer.head", 2e-5), tm.TrainModule("llm")]
    assert tm.parse("all") == [tm.TrainModule("all")]


@pytest.mark.parametrize("text, fragment", [
    ("llm||vte", "empty module name"), (":1e-5", "empty module name"), ("vte:fast", "'fast' is not a learning rate"),
    ("vte:0", "must be a finite number > 0"), ("vte:nan", "finite"), ("llm|vte|llm", "'llm' is listed twice"),
    ("vte:1e-5:2", "not a learning rate"),
])
def test_parse_errors_name_the_key(text, fragment):
    with pytest.raises(ConfigError, match="train_modules") as e:
        tm.parse(text)
    assert fragment in str(e.value)


def test_expand_aliases_paths_and_ovis_style_paths():
    assert tm.expand("vte", OVIS) == ("model.multi_modal_projector.visual_embeddings_table",)
    assert tm.expand("llm.layers.31", OVIS) == ("model.language_model.layers.31",)
    assert tm.expand("visual_tokenizer.vit.layers.0", OVIS) == ("model.vision_tower.layers.0",)  # the longer alias
    assert tm.expand("model.language_model.layers.3", OVIS) == ("model.language_model.layers.3",)
    assert QWEN == {"all": ("",), "llm": ("model.language_model", "lm_head"),
                    "vision": ("model.visual", "!model.visual.merger"), "merger": ("model.visual.merger",)}


def test_selection_longest_prefix_and_carve_outs():
    names = ["model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.1.attn.qkv.weight", "model.visual.merger.mlp.0.weight",
             "model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    sel = tm.Selection.resolve("all|vision:2e-5|merger:1e-4", QWEN, names)
    labels = {n: sel.entry_of(n).label for n in names}
    assert labels == {names[0]: "vision", names[1]: "vision", names[2]: "merger", names[3]: "all", names[4]: "all"}
    alone = tm.Selection.resolve("vision", QWEN, names)
    assert alone.entry_of(names[2]) is None and alone.entry_of(names[0]).label == "vision"
    assert tm.Selection.resolve("all|vision", QWEN, names).entry_of(names[2]).label == "all"  # the carve-out is vision's own
    last = tm.Selection.resolve("model.visual.blocks.-1", QWEN, names)
    assert last.entries[0].paths == ("model.visual.blocks.1",) and last.entry_of(names[0]) is None
    peft = tm.Selection.resolve("merger", QWEN, ["base_model.model." + n for n in names])
    assert peft.entry_of("base_model.model.model.visual.merger.modules_to_save.default.mlp.0.weight").label == "merger"
    with pytest.raises(ConfigError, match=r"'llm' and 'model.language_model' both select 'model.language_model'"):
        tm.Selection.resolve("llm|model.language_model", QWEN, names)
    with pytest.raises(ConfigError, match=r"'model.visual.block' -> 'model.visual.block': the model has no such module"):
        tm.Selection.resolve("model.visual.block", QWEN, names)


def test_recipe_checks_train_modules():
    assert load_recipe({**BASE, "train_modules": "llm|vte:1e-5", "model_type": "ovis2_5"}).model.train_modules == "llm|vte:1e-5"
    for bad, fragment in [
        ({"train_modules": "llm|vte:x"}, "train_modules: 'vte:x'"),
        ({"train_modules": "llm", "tune_mm_vision": True}, "train_modules and tune_mm_vision are both set"),
        ({"train_modules": "llm", "tune_mm_llm": True}, "train_modules and tune_mm_llm are both set"),
        ({"train_modules": "llm", "mm_projector_lr": 1e-4}, "train_modules and mm_projector_lr are both set"),
        ({"train_modules": "vte", "model_type": "qwen2_5_vl"}, "'vte' is neither a module name of qwen2_5_vl (all, llm, vision, merger)"),
        ({"train_modules": "visual_tokenizr", "make_tiny_model": "ovis2_5"}, "'visual_tokenizr' is neither a module name of ovis2_5"),
        ({"train_modules": "llm", "objective": "mdlm"}, "train_modules with objective mdlm"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_recipe({**BASE, **bad})
        assert fragment in str(e.value), str(e.value)
    # A path is left for the model to check; Ovis-style paths under an alias pass too.
    load_recipe({**BASE, "train_modules": "model.language_model.layers.3|llm.layers.1:1e-5", "model_type": "ovis2_5"})


def test_aliases_read_as_their_keys():
    cfg = load_recipe({"model_path": "m", "data_path": "d.jsonl", "eval_data_path": "e.jsonl", "multimodal_max_length": 1024,
                       "single_image_max_pixels": 50176, "single_image_min_pixels": 3136})
    assert (cfg.model.model_name_or_path, cfg.data.dataset_use, cfg.data.eval_dataset, cfg.data.model_max_length,
            cfg.data.max_pixels, cfg.data.min_pixels) == ("m", "d.jsonl", "e.jsonl", 1024, 50176, 3136)
    assert "model_path" not in cfg.to_flat_dict()  # checkpoints and recipe.json hold the keys themselves
    # A command-line override replaces the key whichever name the recipe used.
    assert load_recipe({**BASE, "multimodal_max_length": 100}, {"model_max_length": 200}).data.model_max_length == 200


def test_alias_table_points_at_keys():
    keys = {f.name for cls in SECTIONS.values() for f in cls.__dataclass_fields__.values()}
    assert set(KEY_ALIASES.values()) <= keys and not set(KEY_ALIASES) & keys
    assert "train_modules" in TRAJECTORY_KEYS  # it changes what the weights become


@pytest.mark.parametrize("raw, fragment", [
    ({"model_path": "m", "model_name_or_path": "n"}, "model_path and model_name_or_path are both given; they are the same key (model_name_or_path)"),
    ({"model_name_or_path": "n", "model_path": "m"}, "model_name_or_path and model_path are both given"),
])
def test_an_alias_and_its_key_together_is_an_error(raw, fragment):
    with pytest.raises(ConfigError) as e:
        load_recipe({"dataset_use": "d.jsonl", **raw})
    assert fragment in str(e.value)


def test_messages_name_the_key_as_written():
    with pytest.raises(ConfigError, match=r"multimodal_max_length: 'long' is not a valid int"):
        load_recipe({**BASE, "multimodal_max_length": "long"})
    with pytest.raises(ConfigError, match=r"- multimodal_max_length \(model_max_length\): 0 must be > 0"):
        load_recipe({**BASE, "multimodal_max_length": 0})
    with pytest.raises(ConfigError, match=r"- single_image_min_pixels \(min_pixels\): 0 must be >= 1"):
        load_recipe({**BASE, "single_image_min_pixels": 0})
    with pytest.raises(ConfigError, match=r"did you mean 'model_path'"):
        load_recipe({**BASE, "model_pth": "m"})


def test_keys_list_aliases():
    [key] = find("data_path")
    assert key.name == "dataset_use" and key.aliases == ("data_path",)
    assert "| `max_pixels` (alias `single_image_max_pixels`) |" in render_markdown()
    assert {k.name for k in recipe_keys() if k.aliases} == set(KEY_ALIASES.values())
