"""Shared by the torch engine's option tests: a few optimizer steps of the tiny model on fixed batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture
def tiny_training(vqa_data):
    """`batches(model_dir)` -> (two padded batches of two VQA samples, info); `backend(model_dir, info, **train)`
    -> a TorchBackend of a fresh tiny model (seed 0, learning_rate 1e-3 unless given); `train(backend,
    batches, steps)` -> the per-token losses of that many steps, cycling over the batches."""
    torch = pytest.importorskip("torch")
    from vltune.backends.torch.models import load_model
    from vltune.backends.torch.engine import Engine as TorchBackend
    from vltune.core.recipe import load_recipe
    from vltune.data.collate import collate_padded
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    def recipe(model_dir, **train):
        return load_recipe({"model_name_or_path": str(model_dir), "dataset_use": "x.jsonl", "learning_rate": 1e-3, **train})

    def batches(model_dir):
        dataset = SFTDataset(load_samples(vqa_data["train_file"])[:4], model_dir, max_length=512, max_pixels=12544)
        pad = dataset.tokenizer.pad_token_id
        return [collate_padded([dataset[i], dataset[i + 1]], dataset.info, pad) for i in (0, 2)], dataset.info

    def backend(model_dir, info, **train):
        cfg = recipe(model_dir, **train)
        torch.manual_seed(0)
        return TorchBackend(load_model(model_dir), model_dir, info, cfg.model, cfg.train)

    def train(backend, batches, steps: int) -> list[float]:
        losses = []
        for step in range(steps):
            batch = batches[step % len(batches)]
            count = int((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(backend.forward_backward(batch, 1.0 / count)) / count)
            backend.optimizer_step(1.0, 1.0)
        return losses

    return SimpleNamespace(recipe=recipe, batches=batches, backend=backend, train=train)
