"""Data parallelism on CPU (gloo, 2 processes, fp32): DDP, ZeRO-2, ZeRO-3 and FSDP2 each train the
tiny model 10 steps through `vltune train --nproc 2` and reproduce the loss curve of one process with
the same global batch. The data mixes text-only and image samples so that some micro-steps give one
rank no image (asserted below): these runs finishing inside their timeout is the no-hang proof for
ZeRO-3 and FSDP2 (a hang would stop at the timeout). ZeRO-3 and FSDP2 also resume from step 5 onto
the same curve and save gathered HF weights equal to the single-process ones.
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

STEPS, SEED, TOL = 10, 3, 1e-4
RUN_TIMEOUT_S = 300  # a hung collective never returns; a healthy run takes 10-40 s on 2 cores
ENGINES = {"ddp": [], "zero2": ["--deepspeed", "zero2"], "zero3": ["--deepspeed", "zero3"], "fsdp": ["--fsdp", "true"]}


@pytest.fixture(scope="module")
def mixed_recipe(mixed_jsonl, tiny_qwen2_5_vl) -> Path:
    """24 image samples interleaved with 24 text-only ones; per-rank micro-batch 1, 2 accumulation steps."""
    data = mixed_jsonl(24)
    root = data.parent
    recipe = {
        "model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": str(data), "max_pixels": 12544,
        "model_max_length": 512, "max_steps": STEPS, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "logging_steps": 1, "seed": SEED,
        "tune_mm_vision": True,  # every vision parameter trains: DDP needs their gradients on every rank
        "save_steps": 5,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def _losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def _vltune_train(recipe: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vltune.cli", "train", str(recipe), "--output_dir", str(out_dir), "--no-progress", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def single_run(mixed_recipe, tmp_path_factory) -> Path:
    """The reference: one process, per-device batch 2 = the 2-rank run's global micro-batch."""
    from vltune.training import train

    out = tmp_path_factory.mktemp("single") / "out"
    train(str(mixed_recipe), {"per_device_train_batch_size": 2, "output_dir": str(out)}, show_progress=False)
    return out


def test_mixed_data_gives_a_rank_no_image(mixed_recipe):
    """The 2-rank runs below really meet micro-steps where one rank is text-only and the other is not."""
    rows = [json.loads(line) for line in (mixed_recipe.parent / "mixed.jsonl").read_text().splitlines()]
    order = np.random.default_rng([SEED, 0]).permutation(len(rows))
    has_image = ["image" in rows[i] for i in order[: 2 * 2 * STEPS]]
    pairs = list(zip(has_image[0::2], has_image[1::2]))  # (rank 0, rank 1) of each global micro-batch
    assert sum(a != b for a, b in pairs) >= 3


@pytest.fixture(scope="module")
def two_rank_runs(mixed_recipe, tmp_path_factory):
    """`vltune train --nproc 2` once per engine, shared by the tests: engine -> (output dir, stdout)."""
    root, done = tmp_path_factory.mktemp("two_ranks"), {}

    def run(engine: str) -> tuple[Path, str]:
        if engine not in done:
            out = root / engine
            done[engine] = (out, _vltune_train(mixed_recipe, out, "--nproc", "2", *ENGINES[engine]).stdout)
        return done[engine]

    return run


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_ranks_match_one_process(engine, two_rank_runs, single_run):
    out, stdout = two_rank_runs(engine)
    summary = json.loads(stdout.strip().splitlines()[-1])  # only rank 0 prints it, last
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    expected, got = _losses(single_run), _losses(out)
    assert len(got) == STEPS
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    # Only rank 0 writes: one metrics row per step, and its reduced token count equals the reference's.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (out / "checkpoint-5" / "trainer_state.json").exists() and not list(out.glob(".tmp-*"))


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_save_and_resume(engine, mixed_recipe, two_rank_runs, single_run, tmp_path):
    """Gathered HF weights equal the single-process model; a run resumed at step 5 continues the curve."""
    straight, _ = two_rank_runs(engine)
    expected = _weights(single_run)
    got = _weights(straight)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=0, err_msg=name)
    resumed = tmp_path / "resumed"
    _vltune_train(
        mixed_recipe, resumed, "--nproc", "2", *ENGINES[engine], "--resume_from_checkpoint", str(straight / "checkpoint-5"),
    )
    np.testing.assert_allclose(_losses(resumed), _losses(straight)[5:], atol=1e-6, rtol=0)
