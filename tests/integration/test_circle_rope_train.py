"""`model_type: qwen2_5_vl_circle_rope` through the real command: it trains, and its checkpoint is a stock one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_circle_rope_demo_trains_and_saves_a_stock_checkpoint(tmp_path, tiny_qwen2_5_vl):
    def vltune(*args):
        return subprocess.run([sys.executable, "-m", "vltune.cli", *args], cwd=tmp_path, capture_output=True, text=True)

    proc = vltune(
        "train", "demo", "--no-progress", "--model_type", "qwen2_5_vl_circle_rope",
        "--model_name_or_path", str(tiny_qwen2_5_vl), "--make_tiny_model", "none",
        "--synthetic_vqa", "{out_dir: data, num_train: 320, num_eval: 16, tasks: [color], seed: 5}",
        "--dataset_use", "data/train.jsonl", "--eval_dataset", "data/eval.jsonl",
        "--max_steps", "40", "--logging_steps", "5", "--eval_steps", "0", "--output_dir", "out",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["model_type"] == "qwen2_5_vl_circle_rope"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0], losses

    out = tmp_path / "out"
    assert json.loads((out / "circle_rope.json").read_text())["AGE_mode"] == "strategy_4"
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    stock = transformers.AutoModelForImageTextToText.from_pretrained(out)
    from safetensors.numpy import load_file

    saved = load_file(out / "model.safetensors")
    for name, param in stock.state_dict().items():
        if name in saved:
            assert np.array_equal(param.numpy(), saved[name]), name

    sample = json.loads((tmp_path / "data/eval.jsonl").read_text().splitlines()[0])
    answer = vltune("infer", "--model", "out", "--image", f"data/{sample['image']}",
                    "--prompt", sample["conversations"][0]["value"].replace("<image>", ""),
                    "--max-new-tokens", "4", "--max-pixels", "12544")
    assert answer.returncode == 0, answer.stderr[-2000:]
    predictions = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in (out / "eval_predictions.jsonl").read_text().splitlines()}
    # infer (Circle-RoPE read from circle_rope.json) answers exactly as the trainer's own evaluation did.
    assert answer.stdout.strip().splitlines()[-1].strip() == predictions[sample["id"]].strip()
