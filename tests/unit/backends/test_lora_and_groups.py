"""LoRA through peft (which weights train, where adapters land, save/load) and the AdamW groups."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import torch.nn.functional as F  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vltune.backends.torch.batch import to_model_inputs  # noqa: E402
from vltune.backends.torch.checkpoint import save_hf_model  # noqa: E402
from vltune.backends.torch.lora import DEFAULT_LLM_TARGETS, apply_lora  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.optim import build_param_groups  # noqa: E402
from vltune.core.config import ModelArgs, TrainArgs  # noqa: E402
from vltune.core.families import get_family  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
FLAGS = [f for f in itertools.product([True, False], repeat=3) if any(f)]
VISION_LINEARS = {
    "qwen2_5_vl": {"attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen3_vl": {"attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"},
}
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def batches(tiny_model_dirs, vqa_data) -> dict:
    """Two samples with images, collated for each family (their processors differ in patch size)."""
    samples = load_samples(vqa_data["train_file"])[:2]
    out = {}
    for family, model_dir in tiny_model_dirs.items():
        dataset = SFTDataset(samples, model_dir, max_length=512, max_pixels=12544)
        out[family] = collate_padded([dataset[i] for i in range(len(samples))], dataset.info, dataset.tokenizer.pad_token_id)
    return out


def _args(model_dir, llm=True, vision=True, mlp=True, **lora) -> ModelArgs:
    lora = {"lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, **lora}
    return ModelArgs(
        model_name_or_path=str(model_dir), train_type="lora", tune_mm_llm=llm, tune_mm_vision=vision, tune_mm_mlp=mlp, **lora
    )


def _logits(model, batch) -> torch.Tensor:
    return model(**to_model_inputs(batch, torch.device("cpu")), use_cache=False).logits


def _loss(model, batch) -> torch.Tensor:
    labels = torch.as_tensor(batch["labels"])
    logits = _logits(model, batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _train(model, batch, model_args: ModelArgs, steps: int = 2) -> None:
    """`steps` AdamW steps at lr 1e-2 over build_param_groups. LoRA's B starts at zero, so A only gets
    a gradient from the second step on: two steps are the fewest that move every adapter weight."""
    opt = torch.optim.AdamW(build_param_groups(model, get_family(model.config.model_type).modules, TrainArgs(learning_rate=1e-2)))
    model.train()
    for _ in range(steps):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _kind(name: str) -> str:
    """What a peft-model parameter is: an LLM / vision adapter weight, a trained merger copy, or base."""
    if ".lora_" in name:
        return "lora_vision" if "visual." in name else "lora_llm"
    if ".modules_to_save." in name:
        assert "visual.merger" in name or "visual.deepstack_merger_list" in name, name
        return "merger_copy"
    return "base"


def _lora_layers(model) -> list[str]:
    return [n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("llm, vision, mlp", FLAGS)
def test_lora_step_changes_exactly_the_enabled_parts(tiny_model_dirs, batches, family, llm, vision, mlp):
    args = _args(tiny_model_dirs[family], llm, vision, mlp)
    model = apply_lora(load_model(tiny_model_dirs[family]), args)
    assert isinstance(model, PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {"lora_llm": llm, "lora_vision": vision, "merger_copy": mlp, "base": False}

    kinds = {_kind(n) for n in before}
    assert kinds == {k for k, on in expected.items() if on} | {"base"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if expected[_kind(n)]}

    _train(model, batches[family], args)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == expected[_kind(name)], (name, changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_stay_inside_their_tower(tiny_model_dirs, family):
    model_dir = tiny_model_dirs[family]
    llm_layers = _lora_layers(apply_lora(load_model(model_dir), _args(model_dir, vision=False, mlp=False)))
    assert llm_layers and all(n.startswith("model.language_model.layers.") for n in llm_layers)
    assert {n.rsplit(".", 1)[1] for n in llm_layers} == set(DEFAULT_LLM_TARGETS)  # Qwen2.5-VL's vision MLP has these names too
    assert len(llm_layers) == 2 * len(DEFAULT_LLM_TARGETS)  # 2 decoder layers in the tiny model

    vision_layers = _lora_layers(apply_lora(load_model(model_dir), _args(model_dir, llm=False, mlp=False)))
    assert all(n.startswith("model.visual.blocks.") for n in vision_layers)
    assert {n.split(".", 4)[4] for n in vision_layers} == VISION_LINEARS[family]
    assert len(vision_layers) == 2 * len(VISION_LINEARS[family])

    some = _lora_layers(apply_lora(load_model(model_dir), _args(model_dir, vision=False, lora_target_modules="q_proj, v_proj")))
    assert {n.rsplit(".", 1)[1] for n in some} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="qq_proj"):
        apply_lora(load_model(model_dir), _args(model_dir, lora_target_modules="q_proj,qq_proj"))


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_r_alpha_and_dropout_pass_through(tiny_qwen2_5_vl, dropout):
    model = apply_lora(load_model(tiny_qwen2_5_vl), _args(tiny_qwen2_5_vl, lora_r=4, lora_alpha=12.0, lora_dropout=dropout))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12.0, dropout)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(3.0)
        drop = layer.lora_dropout["default"]
        if dropout == 0.0:
            assert isinstance(drop, torch.nn.Identity) or drop.p == 0.0
        else:
            assert isinstance(drop, torch.nn.Dropout) and drop.p == dropout


def _component(name: str) -> str:
    """The test's own reading of a parameter's component, by prefix rather than substring."""
    name = name.removeprefix(PEFT_PREFIX)
    if name.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list.")):
        return "merger"
    return "vision" if name.startswith("model.visual.") else "llm"


def _check_groups(model, groups, lrs: dict[str, float], weight_decay: float) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    placed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(placed) == sorted(trainable)  # each trainable param exactly once, frozen ones nowhere
    assert len(set(placed)) == len(placed)
    assert len({g["name"] for g in groups}) == len(groups)
    assert all(g["params"] for g in groups)
    for group in groups:
        assert group["base_lr"] == group["lr"]
        for param in group["params"]:
            name = names[id(param)]
            component = _component(name)
            assert group["lr"] == lrs[component], (name, group["name"])
            matrix = param.ndim >= 2 and "norm" not in name
            assert group["weight_decay"] == (weight_decay if matrix else 0.0), name
            assert group["name"] == (component if matrix else f"{component}_no_decay")


@pytest.mark.parametrize(
    "vision_lr, projector_lr",
    [(2e-6, 3e-5), (2e-6, None), (None, 3e-5), (None, None)],
    ids=["both", "vision_only", "projector_only", "neither"],
)
def test_groups_of_a_full_model(tiny_model_dirs, vision_lr, projector_lr):
    family = "qwen3_vl"  # has both a merger and deepstack mergers
    model = load_model(tiny_model_dirs[family])
    model.model.visual.patch_embed.requires_grad_(False)  # a frozen part must appear in no group
    train = TrainArgs(learning_rate=1e-5, vision_tower_lr=vision_lr, mm_projector_lr=projector_lr, weight_decay=0.1)
    groups = build_param_groups(model, get_family(family).modules, train)
    lrs = {"llm": 1e-5, "vision": vision_lr or 1e-5, "merger": projector_lr or 1e-5}
    _check_groups(model, groups, lrs, 0.1)
    assert {g["name"] for g in groups} == {f"{c}{s}" for c in ("llm", "vision", "merger") for s in ("", "_no_decay")}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)


def test_groups_of_a_lora_model(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen3_vl"]
    model = apply_lora(load_model(model_dir), _args(model_dir))
    train = TrainArgs(learning_rate=1e-4, vision_tower_lr=2e-5, mm_projector_lr=5e-4, weight_decay=0.01)
    groups = build_param_groups(model, get_family(model.config.model_type).modules, train)
    _check_groups(model, groups, {"llm": 1e-4, "vision": 2e-5, "merger": 5e-4}, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert all(".lora_" in n for n in by_group["llm"] + by_group["vision"])  # A/B matrices, decayed
    assert "llm_no_decay" not in by_group and "vision_no_decay" not in by_group
    assert all(".modules_to_save." in n for n in by_group["merger"] + by_group["merger_no_decay"])


def _toy_model(shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """A module tree whose parameters have exactly the given dotted names and shapes."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def test_groups_split_by_name_not_by_module_type():
    """Names decide: a 2-D param with "norm" in its name is not decayed; peft prefixes are understood."""
    names = [
        "base_model.model.model.visual.merger.modules_to_save.default.linear_fc1.weight",
        "base_model.model.model.visual.deepstack_merger_list.0.modules_to_save.default.norm.weight",
        "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.default.weight",
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight",
        "base_model.model.model.language_model.layers.0.mlp.down_proj.weight",
        "model.language_model.odd_norm_matrix",
    ]
    toy = _toy_model(dict(zip(names, [(4, 4), (4,), (2, 4), (4, 2), (4, 4), (4, 4)])))
    toy.get_parameter(names[4]).requires_grad_(False)
    train = TrainArgs(learning_rate=1.0, vision_tower_lr=2.0, mm_projector_lr=3.0, weight_decay=0.5)
    groups = build_param_groups(toy, get_family("qwen3_vl").modules, train)
    index = {id(p): names.index(n) for n, p in toy.named_parameters()}
    got = {g["name"]: ([index[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups}
    assert got == {
        "merger": ([0], 3.0, 0.5),
        "merger_no_decay": ([1], 3.0, 0.0),
        "vision": ([2], 2.0, 0.5),
        "llm": ([3], 1.0, 0.5),
        "llm_no_decay": ([5], 1.0, 0.0),
    }


@pytest.mark.parametrize(
    "family, flags, extra",
    [
        ("qwen2_5_vl", (True, True, True), "lm_head"),
        ("qwen3_vl", (True, True, True), None),
        ("qwen3_vl", (False, False, True), None),  # peft's dummy target: modules_to_save only
    ],
    ids=["qwen2_5_vl-all+lm_head", "qwen3_vl-all", "qwen3_vl-merger_only"],
)
def test_saved_adapter_reloads_to_identical_logits(tiny_model_dirs, batches, tmp_path, family, flags, extra):
    model_dir, batch = tiny_model_dirs[family], batches[family]
    args = _args(model_dir, *flags, lora_modules_to_save=extra)
    model = apply_lora(load_model(model_dir), args)
    _train(model, batch, args)
    model.eval()
    with torch.no_grad():
        trained = _logits(model, batch)
        base = _logits(load_model(model_dir), batch)
    assert not torch.allclose(trained, base, atol=1e-4)  # the adapter must matter for the check to mean anything

    out = tmp_path / "adapter"
    save_hf_model(model, model_dir, out)  # what the trainer's save_model / save_checkpoint call
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any("visual.merger." in k for k in keys)
    if family == "qwen3_vl":
        assert any("visual.deepstack_merger_list." in k for k in keys)
    if extra:
        assert any(k.split(".")[2:3] == ["lm_head"] for k in keys)
    assert not any("original_module" in k for k in keys)

    reloaded = PeftModel.from_pretrained(load_model(model_dir), out)
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(reloaded, batch), trained, atol=1e-6, rtol=0)


def test_nothing_to_train_is_an_error(tiny_qwen2_5_vl):
    with pytest.raises(ValueError, match="tune_mm_llm"):
        apply_lora(load_model(tiny_qwen2_5_vl), _args(tiny_qwen2_5_vl, False, False, False))
    with pytest.raises(ValueError, match="lora_modules_to_save"):
        apply_lora(load_model(tiny_qwen2_5_vl), _args(tiny_qwen2_5_vl, lora_modules_to_save="lm_hed"))
