"""Speed options of the torch engine (backends/torch/kernels.py): the same math, or a clear refusal."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.kernels import _padded_mlp_forward, align_vision_mlp, apply_liger_kernels, compile_blocks  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.config import ConfigError, load_recipe  # noqa: E402


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
    with pytest.raises(ValueError, match="not model_type 'llava'"):
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
])
def test_mindspore_backend_refuses_torch_only_options(tiny_qwen2_5_vl, tmp_path, train, named):
    """The speed and low-memory keys of the torch engine (test_low_memory.py) are refused by name."""
    pytest.importorskip("mindspore")
    from vltune.training import _build_mindspore_backend

    cfg = load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "backend": "mindspore",
                       "output_dir": str(tmp_path), **train})
    with pytest.raises(ConfigError, match=f"{named} belong to the torch engine"):
        _build_mindspore_backend(cfg, info=None, circle_rope=None)


def test_liger_and_compile_together_are_refused(tiny_qwen2_5_vl):
    with pytest.raises(ConfigError, match="use_liger_kernel and torch_compile are both set"):
        load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "use_liger_kernel": True, "torch_compile": True})
