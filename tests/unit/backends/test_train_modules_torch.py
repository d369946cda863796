"""train_modules on the torch backend: what apply_freeze / apply_lora leave trainable and the AdamW groups' rates."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from vltune.backends.torch.engine import apply_freeze  # noqa: E402
from vltune.backends.torch.lora import apply_lora  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.optim import build_param_groups, set_learning_rates, train_modules_selection  # noqa: E402
from vltune.core.config import ConfigError, ModelArgs, TrainArgs  # noqa: E402
from vltune.core.families import get_family  # noqa: E402

PEFT = "base_model.model."


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _groups(model, selection, lr=1e-3):
    groups = build_param_groups(model, get_family(model.config.model_type).modules, TrainArgs(learning_rate=lr), selection)
    return {g["name"]: g for g in groups}


def test_ovis_llm_and_vte_train_each_at_its_rate(tiny_models):
    model = load_model(tiny_models["ovis2_5"])
    selection = apply_freeze(model, ModelArgs(train_modules="llm|vte:1e-5"))
    names = {n for n, _ in model.named_parameters()}
    llm = {n for n in names if n.startswith(("model.language_model.", "lm_head."))}
    vte = {n for n in names if n.startswith("model.multi_modal_projector.visual_embeddings_table.")}
    assert vte and _trainable(model) == llm | vte  # tower and visual head frozen
    groups = _groups(model, selection)
    assert {g["name"]: g["lr"] for g in groups.values()} == {"llm": 1e-3, "llm_no_decay": 1e-3, "vte": 1e-5}
    assert all(g["base_lr"] == g["lr"] for g in groups.values())
    assert {id(p) for p in groups["vte"]["params"]} == {id(p) for n, p in model.named_parameters() if n in vte}
    opt = torch.optim.AdamW(list(groups.values()))
    set_learning_rates(opt, 0.5)  # the schedule scales every group, keeping the ratios
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"llm": 5e-4, "llm_no_decay": 5e-4, "vte": 5e-6}


def test_ovis_last_block_and_longest_prefix(tiny_models):
    model = load_model(tiny_models["ovis2_5"])
    selection = apply_freeze(model, ModelArgs(train_modules="all|visual_tokenizer.vit.last_block:2e-5|llm.layers.1:3e-5"))
    unreached = "model.vision_tower.post_layernorm."  # never used by the forward: always frozen (ModuleMap.unreached)
    assert _trainable(model) == {n for n, _ in model.named_parameters() if not n.startswith(unreached)}
    rates = {}
    for group in build_param_groups(model, get_family("ovis2_5").modules, TrainArgs(learning_rate=1e-3), selection):
        rates.update({id(p): group["lr"] for p in group["params"]})
    for name, param in model.named_parameters():
        if name.startswith(unreached):
            continue
        expected = (2e-5 if name.startswith("model.vision_tower.layers.1.")
                    else 3e-5 if name.startswith("model.language_model.layers.1.") else 1e-3)
        assert rates[id(param)] == expected, name


def test_a_path_the_model_lacks_is_a_config_error(tiny_models):
    model = load_model(tiny_models["ovis2_5"])
    with pytest.raises(ConfigError, match=r"train_modules: 'llm.layers.9' -> 'model.language_model.layers.9'"):
        apply_freeze(model, ModelArgs(train_modules="llm.layers.9"))


def test_qwen_default_names(tiny_models):
    model = load_model(tiny_models["qwen2_5_vl"])
    selection = apply_freeze(model, ModelArgs(train_modules="merger:1e-4|llm"))
    names = {n for n, _ in model.named_parameters()}
    merger = {n for n in names if n.startswith("model.visual.merger.")}
    assert _trainable(model) == {n for n in names if not n.startswith("model.visual.")} | merger
    assert {g["name"]: g["lr"] for g in _groups(model, selection).values()} == {
        "merger": 1e-4, "merger_no_decay": 1e-4, "llm": 1e-3, "llm_no_decay": 1e-3}
    apply_freeze(model, ModelArgs(train_modules="vision"))  # the tower without its merger
    assert _trainable(model) == {n for n in names if n.startswith("model.visual.") and n not in merger}


def test_lora_ovis_adapters_in_the_llm_vte_in_full(tiny_models):
    model = load_model(tiny_models["ovis2_5"])
    chosen = "llm|vte:1e-5|visual_tokenizer.vit.last_block:2e-5"
    selection = train_modules_selection(model, chosen)  # what the engine resolves before wrapping
    peft_model = apply_lora(model, ModelArgs(train_type="lora", lora_r=2, lora_alpha=4.0, lora_dropout=0.0, train_modules=chosen))
    trainable = _trainable(peft_model)
    assert trainable and all(
        ".lora_" in n and (n.startswith(PEFT + "model.language_model.layers.") or n.startswith(PEFT + "model.vision_tower.layers.1."))
        or n.startswith(PEFT + "model.multi_modal_projector.visual_embeddings_table.modules_to_save.")
        for n in trainable
    ), sorted(trainable)
    assert any("vision_tower" in n for n in trainable) and any("visual_embeddings_table" in n for n in trainable)
    rates = {g["name"]: g["lr"] for g in _groups(peft_model, selection).values()}
    assert rates == {"llm": 1e-3, "vte": 1e-5, "visual_tokenizer.vit.last_block": 2e-5}


def test_lora_refuses_a_module_with_nothing_to_adapt(tiny_models):
    model = load_model(tiny_models["qwen2_5_vl"])
    with pytest.raises(ConfigError, match="'model.language_model.norm' has nothing LoRA can train"):
        apply_lora(model, ModelArgs(train_type="lora", train_modules="llm|model.language_model.norm"))


@pytest.mark.parametrize("family", sorted(__import__("vltune.core.families", fromlist=["FAMILIES"]).FAMILIES))
def test_every_family_name_resolves_on_its_tiny_model(tiny_models, family):
    """Each family's train_modules names select something, and `all` everything, on the tiny model."""
    from vltune.backends.torch.optim import train_modules_selection

    model = load_model(tiny_models[family])
    names = [n for n, _ in model.named_parameters()]
    for name in get_family(family).train_modules_table:
        selection = train_modules_selection(model, name)
        chosen = [n for n in names if selection.entry_of(n) is not None]
        assert chosen, name
        if name == "all":
            assert chosen == names
        if name == "vision":  # the projectors stay with `merger`
            assert not any(get_family(family).modules.component_of(n) == "merger" for n in chosen)
