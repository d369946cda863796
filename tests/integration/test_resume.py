"""Exact resume: a run resumed from its step-10 checkpoint continues the very same loss curve and weights,
and a run killed (SIGKILL) while writing a checkpoint resumes from the previous complete one.

Every run here starts in a fresh process, as `vltune train` does: bit-exact comparisons across runs
must not depend on what earlier tests left in the pytest process (running a MindSpore model there
first was seen to change the last bits of a later in-process torch run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")


def _recipe(tiny: Path, data: Path, out: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(tiny), "dataset_use": str(data / "train.jsonl"), "max_pixels": 12544,
        "tune_mm_vision": True, "learning_rate": 1e-3, "warmup_ratio": 0.1, "max_steps": 20,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "logging_steps": 1,
        "save_steps": 10, "output_dir": str(out), "seed": 11, **extra,
    }


def _train(recipe: dict) -> dict:
    """`training.train(recipe)` in a fresh interpreter; its summary."""
    code = "import json, sys\nfrom vltune.training import train\nprint(json.dumps(train(json.loads(sys.argv[1]), show_progress=False)))\n"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(recipe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, directory
    return {k: v for f in files for k, v in load_file(f).items()}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert np.array_equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_qwen2_5_vl, vqa_data):
    out = tmp_path_factory.mktemp("straight") / "out"
    _train(_recipe(tiny_qwen2_5_vl, Path(vqa_data["data_path"]), out))
    return out


def test_resume_from_step_10_is_bit_exact(straight, tmp_path, tiny_qwen2_5_vl, vqa_data):
    out = tmp_path / "resumed"
    summary = _train(_recipe(tiny_qwen2_5_vl, Path(vqa_data["data_path"]), out,
                             resume_from_checkpoint=str(straight / "checkpoint-10")))
    assert summary["resumed_from"].endswith("checkpoint-10")
    a, b = _losses(straight), _losses(out)
    assert sorted(b) == list(range(11, 21))
    assert all(a[s] == b[s] for s in range(11, 21)), [(s, a[s], b[s]) for s in range(11, 21) if a[s] != b[s]]
    _assert_same_weights(straight, out)


@pytest.mark.parametrize("loader", [{"dataloader_prefetch": 0}, {"dataloader_num_workers": 1}], ids=["synchronous", "workers"])
def test_every_data_loader_resumes_the_prefetching_run(loader, straight, tmp_path, tiny_qwen2_5_vl, vqa_data):
    """The straight run made batches ahead on a thread (the default) when it saved checkpoint-10: its data
    position is the trainer's, so a synchronous loader or worker processes continue its very curve."""
    out = tmp_path / "resumed"
    _train(_recipe(tiny_qwen2_5_vl, Path(vqa_data["data_path"]), out, resume_from_checkpoint=str(straight / "checkpoint-10"),
                   **loader))
    a, b = _losses(straight), _losses(out)
    assert all(a[s] == b[s] for s in range(11, 21)), [(s, a[s], b[s]) for s in range(11, 21) if a[s] != b[s]]
    _assert_same_weights(straight, out)


def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_resumes(straight, tmp_path, tiny_qwen2_5_vl, vqa_data):
    out = tmp_path / "killed"
    recipe = _recipe(tiny_qwen2_5_vl, Path(vqa_data["data_path"]), out)
    # Kill the process from inside CheckpointManager, after the engine files of checkpoint-20 are written
    # to the temporary directory and before its trainer_state.json: the worst moment.
    killer = (
        "import os, signal, sys, json\n"
        "import vltune.core.checkpointing as c\n"
        "original = c.CheckpointManager._write_trainer_state\n"
        "def write(directory, state):\n"
        "    if state['step'] == 20: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    original(directory, state)\n"
        "c.CheckpointManager._write_trainer_state = staticmethod(write)\n"
        "from vltune.training import train\n"
        "train(json.loads(sys.argv[1]), show_progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", killer, json.dumps(recipe)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / ".tmp-checkpoint-20").is_dir() and not (out / "checkpoint-20").exists()
    assert (out / "checkpoint-10" / "trainer_state.json").exists()
    _assert_same_weights(straight / "checkpoint-10", out / "checkpoint-10")

    summary = _train({**recipe, "resume_from_checkpoint": "auto"})
    assert summary["resumed_from"].endswith("checkpoint-10") and summary["steps"] == 20
    assert _losses(out) == _losses(straight)  # the rows of the killed run past step 10 were dropped
    _assert_same_weights(straight, out)
    assert not (out / ".tmp-checkpoint-20").exists()
