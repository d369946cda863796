"""`fp8: true` composes with FSDP2 and packing: 2 processes on CPU (gloo) train the tiny Qwen2.5-VL with
`fsdp: true`, `data_flatten: true` and `fp8: true` through `vltune.training.train` (fsdp_fp8_worker.py, one
torchrun for this run and the same run without fp8). torch's CPU `torch._scaled_mm` runs the float8
matmuls, so these are real float8 steps under FSDP2's sharded parameters; the worker lifts only the
engine's CPU refusal, as tests/unit/backends/test_fp8.py does.

Asserted: the decoder linears are torchao's Float8Linear inside FSDP2's decoder-layer units, their weights
sharded DTensors (conversion before `fully_shard`); every micro-batch is one packed row of several samples;
the losses are finite and within a few % of the run without fp8; the saved (gathered) weights moved.
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
pytest.importorskip("torchao")

STEPS, SEED = 4, 3
LOSS_RTOL = 0.02  # float8 (e4m3 forward, e5m2 gradients) against fp32 over 4 steps at lr 1e-3: 0.2% seen
RUN_TIMEOUT_S = 300  # a hung collective never returns
WORKER = Path(__file__).with_name("fsdp_fp8_worker.py")


@pytest.fixture(scope="module")
def runs(mixed_jsonl, tiny_qwen2_5_vl, tmp_path_factory) -> dict[str, Path]:
    """One torchrun of 2 ranks: the fp8 run, then the same without fp8. name -> output dir."""
    data = mixed_jsonl(16)
    root = tmp_path_factory.mktemp("fsdp_fp8")
    base = {
        "model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": str(data), "max_pixels": 12544,
        "model_max_length": 512, "max_steps": STEPS, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1, "seed": SEED,
        "data_flatten": True, "fsdp": True, "bf16": True, "tune_mm_vision": True, "save_steps": 0,
    }
    spec = []
    for name, fp8 in (("fp8", True), ("plain", False)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**base, "fp8": fp8}))
        spec.append({"recipe": str(root / f"{name}.yaml"), "output_dir": str(root / name)})
    (root / "runs.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
               str(root / "runs.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {"fp8": root / "fp8", "plain": root / "plain"}


def _losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_fp8_trains_under_fsdp2_with_packed_rows(runs, tiny_qwen2_5_vl):
    probe = json.loads((runs["fp8"] / "probe.json").read_text())
    summary = json.loads((runs["fp8"] / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and probe["engine"] == "FSDPBackend"

    # Float8Linear under FSDP2: the decoder linears, each inside a decoder-layer unit, its weight sharded.
    float8 = probe["float8"]
    assert float8 and all(".language_model.layers." in n for n in float8)
    assert probe["float8_in_fsdp_unit"] == float8 and probe["float8_weight_sharded"] == float8
    assert any(u.endswith(".language_model.layers.0") for u in probe["fsdp_units"])
    assert not json.loads((runs["plain"] / "probe.json").read_text())["float8"]

    # data_flatten: every micro-batch is one [1, L] row; most hold several samples.
    micro = probe["micro_batches"]
    assert len(micro) == STEPS and all(m["rows"] == 1 and m["sequences"] >= 1 for m in micro)
    assert sum(m["sequences"] > 1 for m in micro) >= STEPS // 2

    # Finite losses within a few % of the same 2-rank run in fp32.
    got, reference = _losses(runs["fp8"]), _losses(runs["plain"])
    assert len(got) == len(reference) == STEPS and np.isfinite(got).all()
    np.testing.assert_allclose(got, reference, rtol=LOSS_RTOL, atol=0)
    assert got != reference  # float8 really computed something else

    # The saved (gathered) weights moved, the converted linears' among them.
    before, after = _weights(tiny_qwen2_5_vl), _weights(runs["fp8"])
    assert after.keys() == before.keys()
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    saved = [n.replace("model.language_model.", "model.", 1) + ".weight" for n in float8]  # Qwen2.5-VL's file names
    assert set(saved) <= before.keys() and set(saved) <= moved
