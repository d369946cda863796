"""`fp8: true` (backends/torch/fp8.py): the refusals, which linears torchao converts, and that the converted
model trains.

torch 2.13's CPU build runs `torch._scaled_mm` on float8 tensors (e4m3 / e5m2 with tensorwise scales),
so torchao's Float8Linear runs its float8 forward and backward here: the numeric tests below are real
float8 matmuls, not a stand-in. The engine refuses `fp8` on the CPU (only GPUs of compute capability
8.9+ have float8 tensor cores, and only there is it worth anything), so the tests that train through
the engine lift that one check (`on_cpu_anyway`); the refusal itself is tested on its own.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from vltune.backends.torch import fp8  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.config import ConfigError  # noqa: E402
from vltune.core.families import ModuleMap, get_family  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402


@pytest.fixture
def on_cpu_anyway(monkeypatch):
    """Let the engine convert on the CPU (it refuses there: no float8 tensor cores)."""
    import vltune.backends.torch.engine as engine

    monkeypatch.setattr(engine, "check_fp8_device", lambda device: None)


# --- refusals -------------------------------------------------------------------------------------------

def test_the_engine_refuses_fp8_on_the_cpu_with_one_clear_line(tiny_qwen2_5_vl, tiny_training, monkeypatch):
    _, info = tiny_training.batches(tiny_qwen2_5_vl)
    import vltune.backends.torch.engine as engine

    converted = []
    monkeypatch.setattr(engine, "apply_fp8", lambda model: converted.append(model))
    with pytest.raises(ConfigError) as refused:
        tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True, fp8=True)
    message = str(refused.value)
    assert message.startswith("fp8: true needs a CUDA GPU of compute capability 8.9") and "this run is on cpu" in message
    assert "set fp8: false" in message and "\n" not in message
    assert str(refused.traceback[-1].path).endswith("backends/torch/fp8.py")  # raised by vltune, not inside torchao
    assert not converted


def test_a_gpu_older_than_sm89_is_refused_and_hopper_is_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    problem = fp8.fp8_device_problem(torch.device("cuda", 0))
    assert problem.startswith("fp8: true needs a GPU of compute capability 8.9") and "NVIDIA A100-SXM4-80GB is 8.0" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_device_problem(torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert fp8.fp8_device_problem(torch.device("cuda", 0)) is None


@pytest.mark.parametrize(("extra", "reason"), [
    ({"backend": "mindspore"}, "fp8: true is for backend: torch"),
    ({"bf16": False}, "fp8 needs bf16: true"),
    ({"deepspeed": "zero2"}, "fp8 with deepspeed has not been run"),
])
def test_the_recipe_refuses_what_fp8_cannot_combine_with(extra, reason):
    recipe = {"model_name_or_path": "m", "dataset_use": "x.jsonl", "bf16": True, "fp8": True, **extra}
    with pytest.raises(ConfigError, match=reason):
        load_recipe(recipe)
    load_recipe({**recipe, "fp8": False})  # the same recipe without fp8 is fine


def test_the_bench_hands_fp8_to_the_vltune_path(monkeypatch, tmp_path):
    import vltune.backends.torch.bench as bench
    from vltune.cli import main

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda model_shape, **kwargs: seen.update(kwargs) or {"name": "x", "model": model_shape})
    monkeypatch.setattr(bench, "write_report", lambda result, out: None)
    assert main(["bench", "--model-shape", "qwen2_5_vl-3b", "--fp8", "--out", str(tmp_path)]) in (0, None)
    assert seen["train_options"]["fp8"] is True


# --- which linears ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
def test_exactly_the_decoder_linears_become_float8(family, tiny_models):
    model = load_model(tiny_models[family])
    modules = get_family(family).modules
    params_before = dict(model.named_parameters())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    in_layers = {n for n in linears if n.startswith(modules.decoder_layers + ".")}
    small = {n for n in in_layers if linears[n].in_features % 16 or linears[n].out_features % 16}

    counts = fp8.apply_fp8(model)

    after = dict(model.named_modules())
    converted = {n for n in linears if isinstance(after[n], Float8Linear)}
    assert converted == in_layers - small and counts.converted == len(converted) > 0
    assert counts.skipped_size == len(small)
    for name in set(linears) - converted:  # vision tower, merger, LM head, and the small decoder ones
        assert type(after[name]) is torch.nn.Linear, name
    assert type(model.get_submodule(modules.head)) is torch.nn.Linear
    assert any(n.startswith(modules.vision_blocks + ".") for n in linears) and not any(
        n.startswith(modules.vision_tower + ".") for n in converted)
    assert not any(n.startswith(p + ".") for p in modules.projectors for n in converted)
    assert type(model.get_submodule(modules.embeddings)) is torch.nn.Embedding
    # the same parameter objects under the same names: optimizer, master weights and checkpoints see no change
    assert dict(model.named_parameters()) == params_before
    if family == "qwen3_5":  # the Gated DeltaNet's per-head projections are 4 wide in the tiny model
        layer = next(i for i, t in enumerate(model.config.text_config.layer_types) if t == "linear_attention")
        mixer = model.get_submodule(f"{modules.decoder_layers}.{layer}.{modules.linear_attention}")
        assert type(mixer.in_proj_b) is torch.nn.Linear and type(mixer.in_proj_a) is torch.nn.Linear
        assert isinstance(mixer.in_proj_qkv, Float8Linear) and isinstance(mixer.out_proj, Float8Linear)
        assert small and all(n.endswith(("in_proj_b", "in_proj_a")) for n in small)


def test_the_filter_leaves_adapters_and_the_router_alone():
    pick = fp8.fp8_filter(ModuleMap(moe_router="mlp.gate"))
    linear = torch.nn.Linear(32, 64)
    layer = "model.language_model.layers.3"
    assert pick(linear, f"{layer}.self_attn.q_proj") and pick(linear, f"{layer}.self_attn.q_proj.base_layer")
    assert not pick(linear, f"{layer}.self_attn.q_proj.lora_A.default")
    assert not pick(linear, f"{layer}.self_attn.q_proj.lora_B.default")
    assert not pick(linear, f"{layer}.mlp.gate") and not pick(linear, f"{layer}.mlp.gate.linear")
    assert pick(linear, f"{layer}.mlp.gate_proj")  # a name that merely starts like the router's
    assert not pick(linear, "model.visual.blocks.0.attn.qkv") and not pick(linear, "lm_head")
    assert not pick(torch.nn.Linear(32, 4), f"{layer}.linear_attn.in_proj_b")


# --- it trains ----------------------------------------------------------------------------------------------

def test_lora_converts_the_frozen_base_layer_only_and_trains(tiny_qwen2_5_vl, tiny_training, on_cpu_anyway):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True, fp8=True, train_type="lora", lora_dropout=0.0)
    named = dict(backend.model.named_modules())
    bases = [n for n in named if n.endswith(".base_layer") and ".language_model.layers." in n]
    adapters = [n for n in named if ".lora_A." in n or ".lora_B." in n]
    assert bases and adapters
    assert all(isinstance(named[n], Float8Linear) for n in bases)
    assert all(type(named[n]) is torch.nn.Linear for n in adapters)
    assert all(not named[n].weight.requires_grad for n in bases)
    losses = tiny_training.train(backend, batches, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    backend.forward_backward(batches[0], 1.0)
    grads = [p.grad for n, p in backend.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_float8_loss_is_close_to_full_precision_and_gradients_are_finite(tiny_qwen2_5_vl, tiny_training, on_cpu_anyway):
    """Real float8 matmuls on the CPU (torch._scaled_mm): the first step's loss within 3% of fp32's, finite
    gradients in every converted weight, and the loss still falls over a few steps."""
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    plain = tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True)
    ours = tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True, fp8=True)
    assert any(isinstance(m, Float8Linear) for m in ours.model.modules())
    count = int((batches[0]["labels"][:, 1:] != -100).sum())
    reference = float(plain.forward_backward(batches[0], 1.0 / count)) / count
    loss = float(ours.forward_backward(batches[0], 1.0 / count)) / count
    assert loss == pytest.approx(reference, rel=0.03)
    float8_weights = [m.weight for m in ours.model.modules() if isinstance(m, Float8Linear)]
    assert all(w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0 for w in float8_weights)
    ours.optimizer_step(1.0, 1.0)
    losses = tiny_training.train(ours, batches, 4)
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


def test_float8_with_bf16_master_weights(tiny_qwen2_5_vl, tiny_training, on_cpu_anyway):
    """Float8Linear keeps its weight as the model's parameter: bf16_master_weights makes it bf16 with an fp32
    master, folds its gradient and copies the update back, as for any other linear."""
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True, fp8=True, bf16_master_weights=True)
    layer = next(m for m in backend.model.modules() if isinstance(m, Float8Linear))
    assert layer.weight.dtype == torch.bfloat16 and layer.weight in backend.masters.master_of
    master = backend.masters.master_of[layer.weight]
    before = master.detach().clone()
    losses = tiny_training.train(backend, batches, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(master.detach(), before)
    assert torch.equal(layer.weight.detach(), master.detach().to(torch.bfloat16))


def test_float8_with_pure_bf16_lora(tiny_qwen2_5_vl, tiny_training, on_cpu_anyway):
    """The 7B LoRA setting of tools/peers (pure_bf16 LoRA): the bf16 frozen base linears become Float8Linear with
    their bf16 weights, the adapters stay fp32 nn.Linear, and the run's first loss is the bf16 run's within
    float8's rounding."""
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    lora = {"bf16": True, "pure_bf16": True, "train_type": "lora", "lora_dropout": 0.0}
    reference = tiny_training.train(tiny_training.backend(tiny_qwen2_5_vl, info, **lora), batches, 1)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, fp8=True, **lora)
    named = dict(backend.model.named_modules())
    bases = [n for n in named if n.endswith(".base_layer") and ".language_model.layers." in n]
    assert bases and all(isinstance(named[n], Float8Linear) and named[n].weight.dtype == torch.bfloat16 for n in bases)
    adapters = [p for n, p in backend.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert adapters and {p.dtype for p in adapters} == {torch.float32}
    losses = tiny_training.train(backend, batches, 2)
    assert losses[0] == pytest.approx(reference[0], rel=3e-2) and all(torch.isfinite(torch.tensor(losses)))
