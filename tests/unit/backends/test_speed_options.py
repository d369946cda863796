"""Speed options of the torch engine (backends/torch/kernels.py): the same math, or a clear refusal."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.kernels import apply_liger_kernels, compile_blocks  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.trainer import TorchBackend  # noqa: E402
from vltune.core.config import ConfigError, load_recipe  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


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
    assert all(layer._compiled_call_impl is not None for layer in inner.language_model.layers)


def test_liger_refuses_a_model_it_has_no_kernels_for(tiny_qwen2_5_vl):
    model = load_model(tiny_qwen2_5_vl)
    model.config.model_type = "llava"
    with pytest.raises(ValueError, match="not model_type 'llava'"):
        apply_liger_kernels(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton (CUDA)")
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_liger_kernels_give_the_stock_loss_and_gradients(tiny_model_dirs, vqa_data, model_type):
    pytest.importorskip("liger_kernel")
    model_dir = tiny_model_dirs[model_type]
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], model_dir, max_length=512, max_pixels=12544)
    batch = collate_padded([dataset[0], dataset[1]], dataset.info, dataset.tokenizer.pad_token_id)
    cfg = load_recipe({"model_name_or_path": str(model_dir), "dataset_use": "x.jsonl", "bf16": True})
    from liger_kernel.transformers import LigerRMSNorm

    results = []
    for liger in (False, True):
        torch.manual_seed(0)
        args = cfg.train.__class__(**{**cfg.train.__dict__, "use_liger_kernel": liger})
        backend = TorchBackend(load_model(model_dir), model_dir, dataset.info, cfg.model, args)
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


@pytest.mark.parametrize("key", ["use_liger_kernel", "torch_compile"])
def test_mindspore_backend_refuses_torch_speed_options(tiny_qwen2_5_vl, tmp_path, key):
    pytest.importorskip("mindspore")
    from vltune.training import _build_mindspore_backend

    cfg = load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "backend": "mindspore",
                       "output_dir": str(tmp_path), key: True})
    with pytest.raises(ConfigError, match=f"{key} belong to the torch engine"):
        _build_mindspore_backend(cfg, info=None, circle_rope=None)


def test_liger_and_compile_together_are_refused(tiny_qwen2_5_vl):
    with pytest.raises(ConfigError, match="use_liger_kernel and torch_compile are both set"):
        load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "use_liger_kernel": True, "torch_compile": True})
