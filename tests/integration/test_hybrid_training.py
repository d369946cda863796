"""Qwen3.5 (hybrid Gated DeltaNet + attention) trained on packed rows end to end, on the tiny model.

Packed rows change the layout, not the objective: with the DeltaNet restarted at every sample, training
on flattened rows gives the padded batches' loss curve; and FSDP2 on 2 CPU processes with flattened
rows gives the one-process curve of the same global batch. (The MoE variant's DDP / ZeRO-3 / FSDP2 runs
are in test_moe_training.py; per-sample exactness of a packed row in test_packing_torch.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")

from vltune.training import train  # noqa: E402

HYBRID = "qwen3_5"
STEPS, RUN_TIMEOUT_S = 6, 300


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def recipe(tiny_models, mixed_jsonl) -> dict:
    return {
        "model_name_or_path": str(tiny_models[HYBRID]), "dataset_use": str(mixed_jsonl(12)), "tune_mm_vision": True,
        "max_pixels": 12544, "model_max_length": 512, "max_steps": STEPS, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
        "seed": 3,
    }


@pytest.fixture(scope="module")
def flat_run(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flat") / "out"
    train({**recipe, "data_flatten": True, "output_dir": str(out)}, show_progress=False)
    return out


def test_flattened_rows_train_as_the_padded_batches(recipe, flat_run, tmp_path):
    padded = tmp_path / "padded"
    train({**recipe, "output_dir": str(padded)}, show_progress=False)
    assert len(_losses(flat_run)) == STEPS
    np.testing.assert_allclose(_losses(flat_run), _losses(padded), rtol=1e-5)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_fsdp2_two_ranks_on_flattened_rows_match_one_process(recipe, flat_run, tmp_path):
    """Each rank's micro-batch is 1 sample (one row), the one-process run's 2 (one row of two samples)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "data_flatten": True, "per_device_train_batch_size": 1}))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vltune.cli", "train", str(path), "--output_dir", str(out), "--no-progress",
               "--nproc", "2", "--fsdp", "true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    np.testing.assert_allclose(_losses(out), _losses(flat_run), atol=1e-4, rtol=0)


def test_gradient_checkpointing_replays_the_packed_rows_exactly(recipe, flat_run, tmp_path):
    """Checkpointed decoder layers recompute their forward in backward with the packing arguments again."""
    out = tmp_path / "gc"
    train({**recipe, "data_flatten": True, "gradient_checkpointing": True, "output_dir": str(out)}, show_progress=False)
    np.testing.assert_allclose(_losses(out), _losses(flat_run), rtol=1e-5)


def test_lora_on_packed_rows_then_merge_keeps_the_mtp_head(recipe, tiny_models, tmp_path):
    from safetensors.numpy import load_file

    from vltune.cli import main
    from vltune.core.untrained_weights import CARRIED_FILE

    out = tmp_path / "lora"
    summary = train({**recipe, "data_flatten": True, "train_type": "lora", "max_steps": 2, "output_dir": str(out)},
                    show_progress=False)
    assert summary["train_type"] == "lora" and np.isfinite(summary["train_loss"])
    merged = tmp_path / "merged"
    assert main(["merge-lora", "--model", str(tiny_models[HYBRID]), "--adapter", str(out), "--out", str(merged)]) == 0
    source = load_file(tiny_models[HYBRID] / "model.safetensors")
    kept = load_file(merged / CARRIED_FILE)
    assert kept.keys() == {k for k in source if k.startswith("mtp.")} and all(np.array_equal(kept[k], source[k]) for k in kept)
