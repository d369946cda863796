"""The loss over LM-head logits at trained positions only equals the full-logits loss, values and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.loss import trained_positions  # noqa: E402
from vltune.backends.torch.trainer import TorchBackend, token_loss_sum  # noqa: E402
from vltune.core.config import load_recipe  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_kept_positions_loss_equals_full_loss(tiny_qwen2_5_vl, vqa_data, train_type):
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:3], tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    batch = collate_padded([dataset[i] for i in range(3)], dataset.info, dataset.tokenizer.pad_token_id)
    cfg = load_recipe({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": "x.jsonl", "train_type": train_type, "lora_dropout": 0.0})
    torch.manual_seed(0)
    backend = TorchBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, dataset.info, cfg.model, cfg.train)
    labels = torch.as_tensor(batch["labels"])

    def grads(loss_fn):
        backend.zero_grad()
        loss = loss_fn()
        loss.backward()
        return float(loss), [p.grad.clone() for p in backend.trainable]

    kept_loss, kept_grads = grads(lambda: backend._loss_sum(batch))
    full_loss, full_grads = grads(lambda: token_loss_sum(backend._logits(batch), labels)[0])
    assert abs(kept_loss - full_loss) <= 1e-5 * abs(full_loss)
    for a, b in zip(kept_grads, full_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # the LM head runs on the trained positions only: far fewer than all of them
    keep = trained_positions(labels)
    assert 0 < len(keep) < labels.shape[1] // 4
    assert backend._logits(batch, keep).shape[1] == len(keep)
