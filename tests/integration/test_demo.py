"""`vltune train demo` exactly as `make demo` runs it: the tiny model must learn the held-out task, and
`vltune infer --input` on the eval file (batch mode) then scores it as the trainer's eval did."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_learns_the_held_out_task(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vltune.cli", "train", "demo", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval_accuracy"] >= 0.9, summary
    # The score is computed on held-out samples: no eval image is pixel-identical to a training image.
    data = tmp_path / "runs/synthetic_vqa"

    def digests(split: str) -> set[str]:
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        return {hashlib.sha1((data / r["image"]).read_bytes()).hexdigest() for r in rows}

    eval_rows = (tmp_path / summary["eval_file"]).read_text().splitlines()
    assert len(eval_rows) >= 100 and not digests("train") & digests("eval")
    predictions = [json.loads(line) for line in (tmp_path / "runs/demo/eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(eval_rows)
    assert sum(p["correct"] for p in predictions) / len(predictions) == pytest.approx(summary["eval_accuracy"])

    shown = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo_infer.py"), "runs/demo", "3"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in shown.stdout.splitlines() if ":" in line)
    assert lines["answer"].strip() == predictions[3]["prediction"].strip()
    assert lines["reference"].strip() == predictions[3]["reference"]

    # `vltune infer --input` on the eval file scores the trained run as the trainer's eval did
    batch = subprocess.run(
        [sys.executable, "-m", "vltune.cli", "infer", "--model", "runs/demo", "--input", summary["eval_file"],
         "--output", "runs/demo_batch.jsonl", "--max-new-tokens", "6"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert batch.returncode == 0, batch.stderr[-3000:]
    result = json.loads(batch.stdout.strip().splitlines()[-1])
    assert result["scored"] == result["samples"] == len(eval_rows) and result["errors"] == 0
    assert abs(result["exact_match"] - summary["eval_accuracy"]) <= 0.02, (result, summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_with_another_family_learns_the_task(tmp_path):
    """`--model_type` of another family switches the demo's tiny model (here Ovis2.5: another tower, a
    visual tokenizer and embedding table, 1-D positions, its own template): it learns too."""
    proc = subprocess.run(
        [sys.executable, "-m", "vltune.cli", "train", "demo", "--model_type", "ovis2_5", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["model_type"] == "ovis2_5" and summary["eval_accuracy"] >= 0.9, summary
    assert json.loads((tmp_path / "runs/tiny-ovis2_5/config.json").read_text())["model_type"] == "ovis2_5"
