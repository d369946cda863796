"""The MindSpore engine against the torch engine: one optimizer step, freezing, accumulation, recompute,
LoRA in PEFT format, and checkpoint + exact resume."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.backends.mindspore.checkpoint import parameter_arrays  # noqa: E402
from vltune.backends.mindspore.models import ModelInputs, load_model  # noqa: E402
from vltune.backends.mindspore.engine import Engine as MindSporeBackend  # noqa: E402
from vltune.core.config import ModelArgs, TrainArgs  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


@pytest.fixture(scope="module")
def batch(tiny_qwen2_5_vl, vqa_data):
    samples = load_samples(vqa_data["train_file"])[:4]
    dataset = SFTDataset(samples, tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    return collate_padded([dataset[i] for i in range(4)], dataset.info, dataset.tokenizer.pad_token_id), dataset.info


def _n(data) -> int:
    return int((data["labels"][:, 1:] != -100).sum())


def _rows(data, sl: slice) -> dict:
    """Rows `sl` of a padded batch of one-image samples."""
    sub = {k: data[k][sl] for k in ("input_ids", "labels", "attention_mask")}
    sub["position_ids"] = data["position_ids"][:, sl]
    sub["image_grid_thw"] = data["image_grid_thw"][sl]
    patches = np.cumsum([0] + [int(np.prod(g)) for g in data["image_grid_thw"]])
    sub["pixel_values"] = data["pixel_values"][patches[sl.start] : patches[sl.stop]]
    return sub


def _backend(model_dir, info, model_args=None, train_args=None):
    model_args = model_args or ModelArgs(model_name_or_path=str(model_dir), tune_mm_vision=True)
    return MindSporeBackend(load_model(model_dir), model_dir, info, model_args, train_args or TrainArgs())


def test_one_step_matches_torch(tiny_qwen2_5_vl, batch):
    """Same weights, same batch, AdamW with decay and clipping: the gradients agree per tensor to 1e-5 and
    the updated weights to 1e-5 overall. (Single elements with |grad| near 1e-7 can differ more: Adam's
    first step is lr * g / (|g| + eps), so there the rounding of g shows; see the matrices' bound.)"""
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.backends.torch.engine import Engine as TorchBackend

    data, info = batch
    margs = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), tune_mm_vision=True)
    targs = TrainArgs(learning_rate=1e-3, weight_decay=0.01, vision_tower_lr=2e-3)
    ms_backend = _backend(tiny_qwen2_5_vl, info, margs, targs)
    ms_loss = ms_backend.forward_backward(data, 1.0 / _n(data))
    ms_grads = {p.name: g.asnumpy() for p, g in zip(ms_backend.params, ms_backend.grads)}
    ms_norm = ms_backend.optimizer_step(1.0, 1.0)
    ms_after = parameter_arrays(ms_backend.model)

    torch_backend = TorchBackend(load_torch_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, info, margs, targs)
    torch_loss = float(torch_backend.forward_backward(data, 1.0 / _n(data)))
    torch_grads = {n: p.grad.numpy().copy() for n, p in torch_backend.model.named_parameters()}
    torch_norm = torch_backend.optimizer_step(1.0, 1.0)
    torch_after = {n: p.detach().numpy() for n, p in torch_backend.model.named_parameters()}

    assert abs(ms_loss - torch_loss) / _n(data) <= 1e-5
    assert abs(ms_norm - torch_norm) <= 1e-5 * torch_norm
    assert ms_grads.keys() == torch_grads.keys() == ms_after.keys()
    for name, g in torch_grads.items():
        assert np.linalg.norm(ms_grads[name] - g) <= 1e-5 * np.linalg.norm(g), name
    diff = sum(float(((ms_after[k] - w) ** 2).sum()) for k, w in torch_after.items())
    total = sum(float((w**2).sum()) for w in torch_after.values())
    assert np.sqrt(diff / total) <= 1e-5
    for name, w in torch_after.items():
        if w.ndim >= 2:
            assert np.linalg.norm(ms_after[name] - w) <= 1e-4 * np.linalg.norm(w), name
    assert ms_backend.learning_rates() == {"llm": 1e-3, "llm_no_decay": 1e-3, "vision": 2e-3, "vision_no_decay": 2e-3,
                                           "merger": 1e-3, "merger_no_decay": 1e-3}


@pytest.mark.parametrize("llm, vision, mlp", [(True, False, False), (False, True, True)])
def test_one_step_changes_exactly_the_unfrozen_parameters(tiny_qwen2_5_vl, batch, llm, vision, mlp):
    data, info = batch
    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), tune_mm_llm=llm, tune_mm_vision=vision, tune_mm_mlp=mlp)
    backend = _backend(tiny_qwen2_5_vl, info, args, TrainArgs(learning_rate=1e-2))
    before = parameter_arrays(backend.model)
    backend.forward_backward(data, 1.0 / _n(data))
    backend.optimizer_step(1.0, 1.0)
    after = parameter_arrays(backend.model)
    for name in before:
        group = "mlp" if name.startswith("model.visual.merger") else "vision" if name.startswith("model.visual") else "llm"
        assert (not np.array_equal(before[name], after[name])) == {"llm": llm, "vision": vision, "mlp": mlp}[group], name


@pytest.mark.slow
def test_accumulation_and_recompute_give_the_joined_batch_gradient(tiny_qwen2_5_vl, batch, monkeypatch):
    """Two micro-batches, full recompute and recompute of every second block
    (gradient_checkpointing_every_n_layers: 2) give the joined batch's gradients; the recomputed cells are
    counted at `mindspore.recompute`, the one call every model's stack goes through."""
    data, info = batch
    total = _n(data)
    recomputed = []
    plain_recompute = ms.recompute
    monkeypatch.setattr(ms, "recompute", lambda cell, *a: recomputed.append(cell) or plain_recompute(cell, *a))

    def grads(micro_batches, every=0):
        recomputed.clear()
        train_args = TrainArgs(gradient_checkpointing=every > 0, gradient_checkpointing_every_n_layers=max(every, 1))
        backend = _backend(tiny_qwen2_5_vl, info, train_args=train_args)
        for mb in micro_batches:
            backend.forward_backward(mb, 1.0 / total)
        layers, blocks = backend.model.model.language_model.layers, backend.model.model.visual.blocks
        expected = [*(layers[i] for i in range(0, len(layers), every)), *(blocks[i] for i in range(0, len(blocks), every))] if every else []
        assert sorted(map(id, recomputed)) == sorted(map(id, expected)), every
        return {p.name: g.asnumpy() for p, g in zip(backend.params, backend.grads)}

    whole = grads([data])
    for other in (grads([_rows(data, slice(0, 2)), _rows(data, slice(2, 4))]), grads([data], every=1), grads([data], every=2)):
        for name, g in whole.items():
            assert np.allclose(g, other[name], atol=1e-6, rtol=1e-4), name


def test_recompute_counts_each_stack_from_its_first_block(vqa_data, tmp_path, monkeypatch):
    """gradient_checkpointing_every_n_layers: 2 on 3 vision blocks and 4 decoder layers recomputes blocks 0, 2
    and layers 0, 2 (each stack from its first, as the torch engine marks them; counting the two stacks as
    one would take layers 1 and 3)."""
    from vltune.backends.torch.tiny import TinySize, make_tiny

    make_tiny("qwen2_5_vl", tmp_path, size=TinySize(vision_layers=3, text_layers=4))
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], tmp_path, max_length=512, max_pixels=12544)
    data = collate_padded([dataset[i] for i in range(2)], dataset.info, dataset.tokenizer.pad_token_id)
    recomputed = []
    plain_recompute = ms.recompute
    monkeypatch.setattr(ms, "recompute", lambda cell, *a: recomputed.append(cell) or plain_recompute(cell, *a))
    train_args = TrainArgs(gradient_checkpointing=True, gradient_checkpointing_every_n_layers=2)
    backend = _backend(tmp_path, dataset.info, train_args=train_args)
    backend.forward_backward(data, 1.0 / _n(data))
    layers, blocks = backend.model.model.language_model.layers, backend.model.model.visual.blocks
    assert sorted(map(id, recomputed)) == sorted(map(id, [layers[0], layers[2], blocks[0], blocks[2]]))


def test_lora_adapter_is_peft_format(tiny_qwen2_5_vl, batch, tmp_path):
    """A trained MindSpore LoRA (LLM adapters + merger) saved as PEFT: peft loads it onto transformers and
    gives the MindSpore model's logits; vltune's own loader restores it exactly."""
    from peft import PeftModel

    from vltune.backends.torch.models import load_model as load_torch_model

    data, info = batch
    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), train_type="lora", lora_r=4, lora_dropout=0.0, tune_mm_mlp=True)
    backend = _backend(tiny_qwen2_5_vl, info, args, TrainArgs(learning_rate=1e-2))
    trainable = {p.name for p in backend.params}
    assert trainable and all(".lora_" in n or n.startswith("model.visual.merger.") for n in trainable)
    backend.forward_backward(data, 1.0 / _n(data))
    backend.optimizer_step(1.0, 1.0)
    backend.save_model(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "tokenizer.json").exists()

    peft_model = PeftModel.from_pretrained(load_torch_model(tiny_qwen2_5_vl), str(tmp_path)).eval()
    from vltune.backends.torch.batch import to_model_inputs

    with torch.no_grad():
        ref = peft_model(**to_model_inputs(data, torch.device("cpu"), model=peft_model)).logits.numpy()
    backend.model.set_train(False)
    got = backend.model(ModelInputs.from_batch(data, backend.model.cfg)).asnumpy()
    real = data["attention_mask"].astype(bool)
    assert np.abs(got[real] - ref[real]).max() <= 1e-4 * np.abs(ref[real]).max()

    fresh = _backend(tiny_qwen2_5_vl, info, args)
    fresh.lora.load(tmp_path)
    assert all(np.array_equal(a, parameter_arrays(fresh.model)[k]) for k, a in parameter_arrays(backend.model).items())


def test_checkpoint_resume_takes_the_same_next_step(tiny_qwen2_5_vl, batch, tmp_path):
    data, info = batch
    first, second = _rows(data, slice(0, 2)), _rows(data, slice(2, 4))
    targs = TrainArgs(learning_rate=1e-3, weight_decay=0.01)

    def step(backend, mb):
        backend.forward_backward(mb, 1.0 / _n(mb))
        backend.optimizer_step(0.5, 1.0)

    straight = _backend(tiny_qwen2_5_vl, info, train_args=targs)
    step(straight, first)
    straight.save_checkpoint(tmp_path)
    step(straight, second)

    resumed = _backend(tiny_qwen2_5_vl, info, train_args=targs)
    resumed.load_checkpoint(tmp_path)
    step(resumed, second)
    a, b = parameter_arrays(straight.model), parameter_arrays(resumed.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
