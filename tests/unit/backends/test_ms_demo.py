"""`vltune train` with backend mindspore against backend torch: the same recipe, the same first losses."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mindspore")
pytest.importorskip("torch")


# (micro-batch, steps) per family: the hybrid families' (Gated DeltaNet) MindSpore steps are slow on 2 CPU cores
FAMILY_RUN = {"qwen2_5_vl": (4, 6), "qwen2_vl": (4, 6), "ovis2_5": (4, 6), "qwen3_5": (1, 6), "qwen3_5_moe": (1, 6)}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(FAMILY_RUN))
def test_first_losses_match_torch(tiny_models, vqa_data, tmp_path, model_type):
    """The demo recipe's settings (full fine-tuning with the vision tower, AdamW with decay, cosine with
    warmup, clipping) on the shared tiny model: every per-step loss within 1e-3 of torch's. Ovis2.5 as
    well (its own tower, visual tokenizer and embedding table, 1-D positions), and the hybrid families
    (Gated DeltaNet layers beside attention)."""
    import vltune

    batch, steps = FAMILY_RUN[model_type]
    losses = {}
    for backend in ("torch", "mindspore"):
        out = tmp_path / backend
        summary = vltune.train({
            "model_name_or_path": str(tiny_models[model_type]), "dataset_use": vqa_data["train_file"], "tune_mm_vision": True,
            "max_pixels": 12544, "min_pixels": 3136, "learning_rate": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.05,
            "max_steps": steps, "per_device_train_batch_size": batch, "logging_steps": 1, "max_grad_norm": 1.0, "seed": 0,
            "backend": backend, "output_dir": str(out),
        }, show_progress=False)
        assert summary["backend"] == backend and (out / "model.safetensors").exists()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["torch"]) == len(losses["mindspore"]) == steps
    assert max(abs(a - b) for a, b in zip(losses["torch"], losses["mindspore"])) <= 1e-3, losses
