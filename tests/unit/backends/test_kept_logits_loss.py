"""The LM head on trained positions only -- chunked and checkpointed, or through the stock head with
`logits_to_keep` -- gives the full-logits loss, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch import loss as loss_module  # noqa: E402
from vltune.backends.torch.loss import head_loss_sum, trained_positions  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.backends.torch.loss import token_loss_sum  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


def _backend_and_batch(tiny_qwen2_5_vl, vqa_data, train_type):
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:3], tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    batch = collate_padded([dataset[i] for i in range(3)], dataset.info, dataset.tokenizer.pad_token_id)
    cfg = load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "train_type": train_type, "lora_dropout": 0.0})
    torch.manual_seed(0)
    return TorchBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, dataset.info, cfg.model, cfg.train), batch


def _loss_and_grads(backend, loss_fn):
    backend.zero_grad()
    loss = loss_fn()
    loss.backward()
    return float(loss), [p.grad.clone() for p in backend.trainable]


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_kept_positions_loss_equals_full_loss(tiny_qwen2_5_vl, vqa_data, train_type, monkeypatch):
    backend, batch = _backend_and_batch(tiny_qwen2_5_vl, vqa_data, train_type)
    labels = torch.as_tensor(batch["labels"]).to(backend.device)
    full_loss, full_grads = _loss_and_grads(backend, lambda: token_loss_sum(backend._logits(batch), labels)[0])
    keep = trained_positions(batch["labels"])
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # several checkpointed chunks
    assert len(keep) * 3 > 7
    variants = {"chunked": True, "logits_to_keep": False}  # the single-process path, the data-parallel engines' path
    for name, after_forward in variants.items():
        monkeypatch.setattr(backend, "head_loss_after_forward", after_forward)
        kept_loss, kept_grads = _loss_and_grads(backend, lambda: backend._loss_sum(batch))
        assert abs(kept_loss - full_loss) <= 1e-5 * abs(full_loss), name
        for a, b in zip(kept_grads, full_grads):  # summed in another order over chunks: fp32 rounding only
            assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-7, name
    # the LM head runs on the trained positions only: far fewer than all of them
    assert 0 < len(keep) < labels.shape[1] // 4
    assert backend._forward(batch, torch.as_tensor(keep)).shape[1] == len(keep)


def test_trained_positions_are_those_before_a_trained_label():
    labels = np.array([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert trained_positions(labels).tolist() == [0, 1, 2]


def test_chunked_head_loss_matches_one_pass_and_skips_ignored_targets(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    targets[::4] = -100
    reference = torch.nn.functional.cross_entropy(head(hidden), targets, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(reference, [hidden, head.weight])
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 5)
    chunked = head_loss_sum(head, hidden, targets)
    grads = torch.autograd.grad(chunked, [hidden, head.weight])
    assert torch.allclose(chunked, reference, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

