"""The torch engine: freeze flags, decay groups and one real optimizer step on the tiny model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.config import ModelArgs, TrainArgs  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


def _group(name: str) -> str:
    if name.startswith("model.visual.merger"):
        return "mlp"
    if name.startswith("model.visual"):
        return "vision"
    return "llm"  # language model and lm_head


@pytest.fixture(scope="module")
def batch(tiny_qwen2_5_vl, vqa_data):
    samples = load_samples(vqa_data["train_file"])[:4]
    dataset = SFTDataset(samples, tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    return collate_padded([dataset[i] for i in range(4)], dataset.info, dataset.tokenizer.pad_token_id), dataset.info


@pytest.mark.parametrize("llm, vision, mlp", [f for f in itertools.product([True, False], repeat=3) if any(f)])
def test_one_step_changes_exactly_the_unfrozen_parameters(tiny_qwen2_5_vl, batch, llm, vision, mlp):
    data, info = batch
    model = load_model(tiny_qwen2_5_vl)
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), tune_mm_llm=llm, tune_mm_vision=vision, tune_mm_mlp=mlp)
    backend = TorchBackend(model, tiny_qwen2_5_vl, info, args, TrainArgs(learning_rate=1e-2))
    backend.forward_backward(data, 1.0 / int((data["labels"][:, 1:] != -100).sum()))
    backend.optimizer_step(1.0, 1.0)  # the schedule's factor 1: base learning rate 1e-2
    allowed = {"llm": llm, "vision": vision, "mlp": mlp}
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach().cpu())
        assert changed == allowed[_group(name)], (name, changed)


def test_all_flags_off_is_an_error(tiny_qwen2_5_vl, batch):
    args = ModelArgs(model_name_or_path="x", tune_mm_llm=False, tune_mm_vision=False, tune_mm_mlp=False)
    with pytest.raises(ValueError, match="nothing to train"):
        TorchBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, batch[1], args, TrainArgs())


def test_accumulation_matches_one_big_batch(tiny_qwen2_5_vl, batch):
    """Two micro-batches scaled by the global token count give the gradient of the joined batch."""
    data, info = batch
    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), tune_mm_vision=True)
    total = int((data["labels"][:, 1:] != -100).sum())

    def grads(micro_batches):
        model = load_model(tiny_qwen2_5_vl)
        backend = TorchBackend(model, tiny_qwen2_5_vl, info, args, TrainArgs())
        for mb in micro_batches:
            backend.forward_backward(mb, 1.0 / total)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def rows(sl):
        sub = {k: v[sl] for k, v in data.items() if k in ("input_ids", "labels", "attention_mask")}
        sub["position_ids"] = data["position_ids"][:, sl]
        n_img = sl.stop - sl.start  # one image per synthetic sample
        sub["image_grid_thw"] = data["image_grid_thw"][sl]
        patches = np.cumsum([0] + [int(np.prod(g)) for g in data["image_grid_thw"]])
        sub["pixel_values"] = data["pixel_values"][patches[sl.start] : patches[sl.start + n_img]]
        return sub

    whole = grads([data])
    split = grads([rows(slice(0, 2)), rows(slice(2, 4))])
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=1e-4), name


def _saved_bytes_and_grads(model_dir, data, info, args: ModelArgs, train_args: TrainArgs):
    """One forward + backward: the bytes autograd saved for the backward outside checkpointed blocks (a
    checkpointed block saves only its inputs there), and the gradients."""
    torch.manual_seed(0)
    backend = TorchBackend(load_model(model_dir), model_dir, info, args, train_args)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    total = int((data["labels"][:, 1:] != -100).sum())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.forward_backward(data, 1.0 / total)
    return backend, sum(saved), {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_qwen2_5_vl, batch, train_type):
    """Full checkpointing, and every second block (gradient_checkpointing_every_n_layers: 2), give the
    gradients of no checkpointing; every second block saves more for the backward than full checkpointing
    and less than none, so the unmarked blocks really keep their activations."""
    data, info = batch
    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), tune_mm_vision=True, train_type=train_type, lora_r=4)
    runs = {}
    for every in (0, 1, 2):
        train_args = TrainArgs(gradient_checkpointing=every > 0, gradient_checkpointing_every_n_layers=max(every, 1))
        backend, saved, grads = _saved_bytes_and_grads(tiny_qwen2_5_vl, data, info, args, train_args)
        runs[every] = saved, grads
        layers, blocks = backend.base.model.language_model.layers, backend.base.model.visual.blocks
        assert backend.base.model.language_model.gradient_checkpointing == (every > 0)
        assert [layer.gradient_checkpointing for layer in layers] == [every > 0 and i % every == 0 for i in range(len(layers))]
        assert [block.gradient_checkpointing for block in blocks] == [every > 0 and i % every == 0 for i in range(len(blocks))]
    assert runs[1][0] < runs[2][0] < runs[0][0], {every: saved for every, (saved, _) in runs.items()}
    plain = runs[0][1]
    for every in (1, 2):
        recomputed = runs[every][1]
        assert plain.keys() == recomputed.keys() and plain
        for name in plain:
            assert torch.allclose(plain[name], recomputed[name], atol=1e-6, rtol=1e-5), (every, name)


def test_python_api_is_the_command(tiny_qwen2_5_vl, vqa_data, tmp_path):
    import vltune

    summary = vltune.train({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": vqa_data["train_file"],
                            "max_steps": 2, "per_device_train_batch_size": 2, "max_pixels": 12544,
                            "output_dir": str(tmp_path)}, show_progress=False)
    assert summary["steps"] == 2 and (tmp_path / "model.safetensors").exists()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert ("peak_rss_gib" in rows[-1] or "peak_mem_gib" in rows[-1]) and "lr_llm" in rows[-1]


def test_forward_backward_leaves_the_loss_on_the_device(tiny_qwen2_5_vl, batch):
    """The summed loss comes back as a detached 0-d tensor (core.contracts): the loop reads it once per
    step, so the engine never waits for a micro-batch's backward before queueing the next forward."""
    data, info = batch
    backend = TorchBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, info, ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl)), TrainArgs())
    loss = backend.forward_backward(data, 1.0)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad
    assert loss.device == backend.device and float(loss) > 0


def test_training_mode_is_set_only_when_something_left_it(tiny_qwen2_5_vl, batch, monkeypatch):
    """forward_backward walks the module tree with `train()` only after evaluation switched the model
    to eval mode (the walk is host time in every micro-batch otherwise); after eval_loss every module
    trains again."""
    data, info = batch
    backend = TorchBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, info, ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl)), TrainArgs())
    backend.forward_backward(data, 1.0)
    walks = []
    original = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walks.append(mode) or original(self, mode))
    backend.forward_backward(data, 1.0)
    assert walks == []
    backend.eval_loss(data)
    assert not any(m.training for m in backend.model.modules())
    backend.forward_backward(data, 1.0)
    assert walks and all(m.training for m in backend.model.modules())


def test_lora_base_layers_train_in_training_mode(tiny_qwen2_5_vl):
    """peft's wrapper starts in training mode around a base from_pretrained left in eval mode: the backend
    puts every module in training mode (gradient checkpointing and dropout look at each module's flag)."""
    from vltune.backends.torch.models import load_model
    from vltune.backends.torch.engine import Engine as TorchBackend
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.data.model_info import read_model_info

    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl), train_type="lora")
    backend = TorchBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, read_model_info(tiny_qwen2_5_vl), args, TrainArgs())
    backend.train_mode()
    assert all(m.training for m in backend.model.modules())
