"""`vltune train demo --objective mdlm` on the tiny model: the masked-diffusion loss goes down, the
saved model carries `<|mask|>`, and `vltune infer --objective mdlm` answers as the evaluation did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402
from vltune.training import mdlm_objective  # noqa: E402


def _vltune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vltune.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory, tiny_model_dirs) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("mdlm")
    proc = _vltune(
        "train", "demo", "--objective", "mdlm", "--no-progress",
        "--model_name_or_path", str(tiny_model_dirs["qwen2_5_vl"]), "--make_tiny_model", "none",
        "--synthetic_vqa", "{out_dir: data, num_train: 64, num_eval: 8, tasks: [color], seed: 4}",
        "--dataset_use", "data/train.jsonl", "--eval_dataset", "data/eval.jsonl",
        "--max_steps", "30", "--logging_steps", "5", "--eval_steps", "0", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-3", "--warmup_ratio", "0", "--output_dir", "out", "--seed", "4",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_lowers_the_masked_diffusion_loss(mdlm_run, tiny_model_dirs):
    """The held-out loss under identical masks (seeded by the batch) before and after training."""
    work, summary = mdlm_run
    assert summary["objective"] == "mdlm" and summary["steps"] == 30
    base = tiny_model_dirs["qwen2_5_vl"]
    cfg = load_recipe("demo", {"model_name_or_path": str(base), "make_tiny_model": None, "objective": "mdlm", "seed": 4})
    samples = load_samples(work / "data" / "eval.jsonl")
    losses = {}
    for name, model_dir in (("before", base), ("after", work / "out")):
        dataset = SFTDataset(samples, model_dir, max_length=256, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
        batch = collate_padded([dataset[i] for i in range(len(samples))], dataset.info, dataset.tokenizer.pad_token_id)
        backend = TorchBackend(load_model(model_dir), model_dir, dataset.info, cfg.model, cfg.train, mdlm=mdlm_objective(cfg))
        loss_sum, count = backend.eval_loss(batch)
        losses[name] = loss_sum / count
    assert losses["after"] < 0.5 * losses["before"], losses
    assert summary["eval_loss"] == pytest.approx(losses["after"], rel=1e-4)  # the run's own eval saw the same masks

    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(np.isfinite(r["loss"]) for r in rows) and len(rows) == 6


def test_saved_model_and_infer(mdlm_run):
    work, summary = mdlm_run
    out = work / "out"
    saved = json.loads((out / "mdlm.json").read_text())
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert {"content": "<|mask|>", "id": saved["mask_token_id"]}.items() <= next(
        t for t in tokenizer["added_tokens"] if t["content"] == "<|mask|>").items()
    predictions = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    sample = json.loads((work / "data" / "eval.jsonl").read_text().splitlines()[0])
    recipe = json.loads((out / "recipe.json").read_text())
    proc = _vltune(
        "infer", "--model", str(out), "--objective", "mdlm", "--image", str(work / "data" / sample["image"]),
        "--prompt", sample["conversations"][0]["value"].replace("<image>", ""),
        "--max-new-tokens", str(recipe["eval_max_new_tokens"]),
        "--min-pixels", str(recipe["min_pixels"]), "--max-pixels", str(recipe["max_pixels"]),
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A 30-step model may answer in whitespace, so compare verbatim: the command's sampler (one row)
    # produced exactly what the evaluation's batched sampler did, and that is not nothing.
    assert predictions[0]["prediction"], "the sampler produced no tokens"
    assert proc.stdout == predictions[0]["prediction"] + "\n"
