"""Speed options of the torch engine (backends/torch/speed.py, bf16 master weights in optim.py): the same math, or a clear refusal."""

from __future__ import annotations

import importlib.util
import re

import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.speed import _padded_mlp_forward, align_vision_mlp, apply_liger_kernels, compile_blocks  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.config import ConfigError  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402


def test_compiled_blocks_train_like_eager_ones(tiny_qwen2_5_vl, tiny_training):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    plain = tiny_training.backend(tiny_qwen2_5_vl, info)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, torch_compile=True)
    eager, compiled = tiny_training.train(plain, batches, 3), tiny_training.train(backend, batches, 3)
    assert compiled == pytest.approx(eager, rel=1e-4)
    # the recipe key really compiled the blocks (equal losses alone would also hold without it)
    layers = backend.base.model.language_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in plain.base.model.language_model.layers)
    assert eager[2] < eager[0]  # it trains


def test_compile_blocks_compiles_every_decoder_layer_and_vision_block(tiny_qwen2_5_vl):
    model = load_model(tiny_qwen2_5_vl)
    inner = model.model
    n = compile_blocks(model)
    assert n == len(inner.language_model.layers) + len(inner.visual.blocks)
    assert all(block._compiled_call_impl is not None for block in [*inner.language_model.layers, *inner.visual.blocks])


def test_compiled_blocks_take_no_fusion_decision_on_the_row_length(tiny_qwen2_5_vl, monkeypatch):
    """Inductor's mix-order reduction fusion guards on the row length (2560 and 4096 tokens for the 3B
    model), which recompiled the decoder layers inside timed steps on an H100: every block is compiled
    with it off, and the option is one this torch has (an unknown key fails at the first forward)."""
    import torch._inductor.config as inductor_config

    model = load_model(tiny_qwen2_5_vl)
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    n = compile_blocks(model)
    assert len(calls) == n and all(c == {"dynamic": True, "options": {"triton.mix_order_reduction": False}} for c in calls)
    assert isinstance(inductor_config.triton.mix_order_reduction, bool)


def test_padded_vision_mlp_gives_the_stock_output_and_gradients(tiny_model_dirs):
    """The zero-padded MLP (176 wide in the tiny model, padded to 192) is the same function with the same
    gradients on the unpadded weights; the weights and the checkpoint's tensors keep their shapes."""
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    stock, padded = load_model(model_dir), load_model(model_dir)
    shapes = {k: v.shape for k, v in padded.state_dict().items()}
    assert align_vision_mlp(padded) == len(padded.model.visual.blocks)
    assert {k: v.shape for k, v in padded.state_dict().items()} == shapes
    mlp = padded.model.visual.blocks[0].mlp
    assert mlp.gate_proj.out_features == 176 and mlp.vltune_pad == 16
    assert mlp.forward.__func__ is _padded_mlp_forward  # the padded forward is the one compared below
    torch.manual_seed(0)
    x = torch.randn(37, mlp.gate_proj.in_features)
    outputs, grads = [], []
    for model in (stock, padded):
        block_mlp = model.model.visual.blocks[0].mlp
        out = block_mlp(x)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append([block_mlp.gate_proj.weight.grad, block_mlp.up_proj.bias.grad, block_mlp.down_proj.weight.grad])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[1], grads[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vision_mlp_padding_leaves_aligned_and_adapted_mlps_alone(tiny_model_dirs):
    model = load_model(tiny_model_dirs["qwen2_5_vl"])
    assert align_vision_mlp(model, multiple=16) == 0  # 176 is a multiple of 16
    model.model.visual.blocks[0].mlp.gate_proj = torch.nn.Sequential(model.model.visual.blocks[0].mlp.gate_proj)
    assert align_vision_mlp(model) == len(model.model.visual.blocks) - 1  # a wrapped linear (LoRA) keeps its forward
    assert "forward" not in vars(model.model.visual.blocks[0].mlp)
    assert align_vision_mlp(load_model(tiny_model_dirs["qwen3_vl"])) == 0  # fc1/fc2 MLPs: not this layout


def test_the_backend_pads_the_vision_mlp_and_trains(tiny_qwen2_5_vl, tiny_training):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info)
    assert all(block.mlp.forward.__func__ is _padded_mlp_forward for block in backend.base.model.visual.blocks)
    losses = tiny_training.train(backend, batches, 3)
    assert losses[2] < losses[0]


def test_liger_refuses_a_model_it_has_no_kernels_for(tiny_qwen2_5_vl):
    model = load_model(tiny_qwen2_5_vl)
    model.config.model_type = "llava"
    with pytest.raises(ValueError, match="'llava' is not a model family vltune supports"):
        apply_liger_kernels(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton (CUDA)")
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_liger_kernels_give_the_stock_loss_and_gradients(tiny_model_dirs, tiny_training, model_type):
    pytest.importorskip("liger_kernel")
    model_dir = tiny_model_dirs[model_type]
    (batch, _), info = tiny_training.batches(model_dir)
    from liger_kernel.transformers import LigerRMSNorm

    results = []
    for liger in (False, True):
        backend = tiny_training.backend(model_dir, info, bf16=True, use_liger_kernel=liger)
        norm = backend.base.model.language_model.norm
        assert (getattr(norm.forward, "__func__", None) is LigerRMSNorm.forward) == liger  # the kernel is the one that ran
        loss = backend._loss_sum(batch)
        loss.backward()
        results.append((float(loss), torch.cat([p.grad.float().flatten() for p in backend.trainable])))
    (stock_loss, stock_grad), (liger_loss, liger_grad) = results
    assert abs(liger_loss - stock_loss) <= 1e-3 * abs(stock_loss)
    assert float((liger_grad - stock_grad).norm() / stock_grad.norm()) < 1e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_the_package_says_what_to_install(tiny_qwen2_5_vl):
    with pytest.raises(RuntimeError, match="needs the liger-kernel package"):
        apply_liger_kernels(load_model(tiny_qwen2_5_vl))


@pytest.mark.parametrize(("train", "named"), [
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"torch_compile": True}, "torch_compile"),
    ({"optim": "adamw_torch_8bit"}, "optim: adamw_torch_8bit"),
    ({"pure_bf16": True, "bf16": True, "train_type": "lora"}, "pure_bf16"),
    ({"bf16_master_weights": True, "bf16": True}, "bf16_master_weights"),
])
def test_mindspore_backend_refuses_torch_only_options(tiny_qwen2_5_vl, tmp_path, train, named):
    """The speed and low-memory keys of the torch engine (test_low_memory.py) are refused by name."""
    pytest.importorskip("mindspore")
    from vltune.backends.mindspore.parallel import build_backend

    cfg = load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "backend": "mindspore",
                       "output_dir": str(tmp_path), **train})
    with pytest.raises(ConfigError, match=f"{named} belong to the torch engine"):
        build_backend(cfg, info=None, circle_rope=None)


def test_liger_and_compile_together_are_refused(tiny_qwen2_5_vl):
    with pytest.raises(ConfigError, match="use_liger_kernel and torch_compile are both set"):
        load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "use_liger_kernel": True, "torch_compile": True})


def _master_options() -> dict:
    return {"bf16": True, "bf16_master_weights": True}


def test_bf16_master_weights_compute_in_bf16_and_update_fp32_masters(tiny_qwen2_5_vl, tiny_training):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    reference = tiny_training.train(tiny_training.backend(tiny_qwen2_5_vl, info), batches, 4)  # fp32 on the CPU
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, **_master_options())
    trained = [p for p in backend.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    assert len(backend.masters.masters) == len(trained) and {m.dtype for m in backend.trainable} == {torch.float32}
    assert {id(p) for p in backend.trainable} == {id(m) for m in backend.masters.masters}  # AdamW and clipping see the masters
    assert backend.autocast_dtype is torch.bfloat16
    losses = tiny_training.train(backend, batches, 4)
    assert losses[0] == pytest.approx(reference[0], rel=2e-2)  # bf16 compute of the same model
    assert losses[3] < losses[0] - 0.1
    for param, master in backend.masters.master_of.items():
        assert torch.equal(param, master.to(torch.bfloat16))  # the model holds the rounded masters
        assert param.grad is None and master.grad is None  # folded, then zeroed by the step


def test_bf16_master_weights_accumulate_micro_batches_in_fp32(tiny_qwen2_5_vl, tiny_training):
    (first, second), info = tiny_training.batches(tiny_qwen2_5_vl)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, **_master_options())

    def master_grads(*batches):
        for batch in batches:
            backend.forward_backward(batch, 1.0)
        grads = [m.grad.clone() for m in backend.masters.masters]
        backend.zero_grad()
        return grads

    alone = [master_grads(first), master_grads(second)]
    together = master_grads(first, second)
    assert all(g.dtype == torch.float32 for g in together)
    assert all(torch.equal(t, a + b) for t, a, b in zip(together, *alone))  # fp32 sums of the bf16 gradients
    assert all(p.grad is None for p in backend.masters.master_of)  # no bf16 gradient is kept


def test_master_weights_keep_updates_below_bf16_resolution():
    from vltune.backends.torch.optim import MasterWeights

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].requires_grad_(False)
    exact = model[1].weight.data.to(torch.bfloat16).float()
    model[1].weight.data = exact.clone()  # a frozen weight bf16 holds exactly: goes to bf16
    masters = MasterWeights(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.bfloat16
    assert model[1].bias.dtype == torch.float32  # frozen and not exact in bf16: stays fp32, unrounded
    optimizer = torch.optim.SGD(masters.masters, lr=1.0)
    start = [m.detach().clone() for m in masters.masters]
    for _ in range(4):  # steps of 1e-4 on weights of ~0.3: each below bf16's resolution there (~1e-3)
        for m in masters.masters:
            m.grad = torch.full_like(m, -1e-4)
        optimizer.step()
        masters.copy_to_model()
    moved = [float((m - s).abs().min()) for m, s in zip(masters.masters, start)]
    assert min(moved) == pytest.approx(4e-4, rel=1e-3)  # every master moved by the full 4 x 1e-4
    assert torch.equal(model[0].weight, masters.master_of[model[0].weight].to(torch.bfloat16))


def test_bf16_master_weights_resume_exactly_and_save_the_masters(tiny_qwen2_5_vl, tiny_training, tmp_path):
    from transformers import AutoModelForImageTextToText

    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    first = tiny_training.backend(tiny_qwen2_5_vl, info, **_master_options())
    tiny_training.train(first, batches, 2)
    first.save_checkpoint(tmp_path)
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    own = first.model.state_dict(keep_vars=True)
    trained = {key: first.masters.master_of[value] for key, value in own.items() if value in first.masters.master_of}
    assert trained and all(torch.equal(saved[key], master) for key, master in trained.items())  # fp32 masters on disk
    # ... not their bf16 rounding: after two updates the masters hold values bf16 cannot
    assert any(not torch.equal(master, master.to(torch.bfloat16).float()) for master in trained.values())
    expected = tiny_training.train(first, batches, 2)
    resumed = tiny_training.backend(tiny_qwen2_5_vl, info, **_master_options())
    resumed.load_checkpoint(tmp_path)
    assert tiny_training.train(resumed, batches, 2) == expected


@pytest.mark.parametrize(("train", "message"), [
    ({"bf16_master_weights": True}, "bf16_master_weights needs bf16: true"),
    ({**_master_options(), "pure_bf16": True, "optim": "adamw_torch_8bit"}, "bf16_master_weights and pure_bf16 are both set"),
    ({**_master_options(), "train_type": "lora"}, "bf16_master_weights is for train_type full"),
    ({**_master_options(), "deepspeed": "zero2"}, "bf16_master_weights is for one process; deepspeed"),
    ({**_master_options(), "optim": "adamw_torch_8bit"}, "bf16_master_weights updates fp32 masters with adamw_torch"),
])
def test_bf16_master_weights_refuse_what_does_not_apply(tiny_qwen2_5_vl, tiny_training, train, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_training.recipe(tiny_qwen2_5_vl, **train)


def test_bf16_master_weights_are_refused_across_ddp_ranks(tiny_qwen2_5_vl, tiny_training):
    from types import SimpleNamespace

    from vltune.backends.torch.parallel import build_torch_backend

    cfg = tiny_training.recipe(tiny_qwen2_5_vl, **_master_options())
    ctx = SimpleNamespace(world_size=2, rank=0, local_rank=0, is_main=True)
    with pytest.raises(ConfigError, match="bf16_master_weights is for one process"):
        build_torch_backend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, None, cfg.model, cfg.train, None, None, ctx)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "qwen3_5", "ovis2_5"])
def test_checkpoint_every_counts_each_stack_from_its_first_block(family, tmp_path):
    """gradient_checkpointing_every_n_layers: 2 on 3 vision blocks and 4 decoder layers marks blocks 0, 2 and
    layers 0, 2, each stack counted from its first (as the MindSpore engine does). transformers' own
    `every_n_layers` counts the two stacks as one, which would mark layers 1 and 3 here."""
    from vltune.backends.torch.speed import checkpoint_every
    from vltune.backends.torch.tiny import TinySize, make_tiny
    from vltune.core.families import get_family

    make_tiny(family, tmp_path, size=TinySize(vision_layers=3, text_layers=4))
    model = load_model(tmp_path)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpoint_every(model, 2) == 2 + 2
    modules = get_family(model.config.model_type).modules
    assert [layer.gradient_checkpointing for layer in model.get_submodule(modules.decoder_layers)] == [True, False, True, False]
    assert [block.gradient_checkpointing for block in model.get_submodule(modules.vision_blocks)] == [True, False, True]
