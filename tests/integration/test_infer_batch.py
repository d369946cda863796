"""Batch inference (`vltune infer --input --output`): errors recorded, interrupted runs resumed exactly
once, and the trained model scoring its held-out file as the trainer's own evaluation did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from vltune.core.generation import GenerationSettings  # noqa: E402
from vltune.data.formats import SampleError  # noqa: E402
from vltune.inference import Predictor  # noqa: E402
from vltune.inference_batch import run_batch  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def batch_input(vqa_data, tmp_path_factory) -> Path:
    """Six held-out VQA records (absolute image paths), plus one per kind of trouble and of layout."""
    eval_file = Path(vqa_data["eval_file"])
    records = [json.loads(line) for line in eval_file.read_text().splitlines()[:6]]
    for r in records:
        r["image"] = str(eval_file.parent / r["image"])
    lines = [json.dumps(r) for r in records]
    missing = {**records[0], "id": "missing-image", "image": "/nonexistent/x.png"}
    unanswered = {"id": "no-answer", "messages": [{"role": "user", "content": [
        {"type": "image", "image": records[1]["image"]}, {"type": "text", "text": "What color is it?"}]}]}
    lines[2:2] = [json.dumps(missing), "{not json", json.dumps(unanswered)]
    path = tmp_path_factory.mktemp("batch") / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def predictor(tiny_qwen2_5_vl) -> Predictor:
    return Predictor(tiny_qwen2_5_vl, max_pixels=12544, settings=GenerationSettings(max_new_tokens=8))


@pytest.fixture(scope="module")
def full_run(predictor, batch_input, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("full") / "out.jsonl"
    return out, run_batch(predictor, batch_input, out, show_progress=False)


def test_each_sample_gets_one_line_with_its_prediction_or_error(full_run, batch_input):
    out, summary = full_run
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 9 and summary["samples"] == 9 and summary["written"] == 9
    by_id = {r["id"]: r for r in rows}
    assert "error" in by_id["missing-image"] and "/nonexistent/x.png" in by_id["missing-image"]["error"]
    assert "malformed JSON" in by_id["4"]["error"]  # line 4 is not JSON: keyed by its line number
    assert "prediction" in by_id["no-answer"] and "error" not in by_id["no-answer"]
    # The input record is kept as it was, reference answer included; only prediction/error are added.
    first = json.loads(batch_input.read_text().splitlines()[0])
    assert {k: v for k, v in by_id[first["id"]].items() if k != "prediction"} == first
    assert summary["errors"] == 2 and summary["scored"] == 7  # the unanswered sample has no reference


def test_a_torn_last_line_is_redone_and_finished_lines_are_kept(full_run, predictor, batch_input, tmp_path):
    out, _ = full_run
    whole = out.read_bytes()
    lines = whole.split(b"\n")
    resumed = tmp_path / "out.jsonl"
    resumed.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])  # killed mid-write
    summary = run_batch(predictor, batch_input, resumed, show_progress=False)
    assert (summary["already_done"], summary["written"]) == (4, 5)
    assert resumed.read_bytes() == whole

    resumed.write_bytes(b"\n".join(lines[:3]))  # killed between a line and its newline
    summary = run_batch(predictor, batch_input, resumed, show_progress=False)
    assert (summary["already_done"], summary["written"]) == (3, 6)
    assert resumed.read_bytes() == whole

    summary = run_batch(predictor, batch_input, resumed, show_progress=False)  # nothing left to do
    assert (summary["already_done"], summary["written"]) == (9, 0) and resumed.read_bytes() == whole


def test_a_damaged_line_before_the_end_stops_the_resume(full_run, predictor, batch_input, tmp_path):
    out, _ = full_run
    lines = out.read_text().splitlines()
    damaged = tmp_path / "out.jsonl"
    damaged.write_text("\n".join([lines[0], lines[1][:20], *lines[2:5]]) + "\n")
    with pytest.raises(SampleError, match=r"out.jsonl:2: not an output line"):
        run_batch(predictor, batch_input, damaged, show_progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "someone-else", "prediction": "x"}) + "\n")
    with pytest.raises(SampleError, match="none of its ids are in the input"):
        run_batch(predictor, batch_input, other, show_progress=False)


def test_a_killed_run_restarted_writes_each_line_exactly_once(tiny_qwen2_5_vl, vqa_data, tmp_path):
    """A real `vltune infer --input` process, SIGKILLed once a few lines are out, then run again."""
    eval_file = Path(vqa_data["eval_file"])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "vltune.cli", "infer", "--model", str(tiny_qwen2_5_vl), "--input", str(eval_file),
           "--output", str(out), "--max-new-tokens", "48", "--max-pixels", "12544", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it slower"
    before = out.read_bytes()
    finished_before = before[: before.rfind(b"\n") + 1]
    n_before = finished_before.count(b"\n")
    assert 3 <= n_before < 16

    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["already_done"] == n_before and summary["written"] == 16 - n_before
    after = out.read_bytes()
    assert after.startswith(finished_before)  # finished lines are not rewritten
    ids = [r["id"] for r in _rows(out)]
    expected = [json.loads(line)["id"] for line in eval_file.read_text().splitlines()]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)) == 16


def test_trained_model_scores_its_held_out_file_as_the_trainers_eval(tiny_qwen2_5_vl, tmp_path):
    """A short run on the demo's colour task; batch mode on its eval file gives the run's eval_accuracy."""
    from vltune.training import train

    summary = train({
        "model_name_or_path": str(tiny_qwen2_5_vl), "tune_mm_vision": True,
        "synthetic_vqa": {"out_dir": str(tmp_path / "data"), "num_train": 320, "num_eval": 50, "tasks": ["color"], "seed": 5},
        "dataset_use": str(tmp_path / "data" / "train.jsonl"), "eval_dataset": str(tmp_path / "data" / "eval.jsonl"),
        "max_pixels": 12544, "min_pixels": 3136, "model_max_length": 256, "output_dir": str(tmp_path / "run"),
        "learning_rate": 1e-3, "max_steps": 80, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 25,
        "eval_steps": 80, "logging_steps": 20, "eval_max_new_tokens": 6, "seed": 0, "warmup_ratio": 0.05,
    }, show_progress=False)
    out = tmp_path / "predictions.jsonl"
    # Pixel limits come from the run's recipe.json; max_new_tokens as the trainer's eval.
    batch = run_batch(Predictor(tmp_path / "run", settings=GenerationSettings(max_new_tokens=6)),
                      tmp_path / "data" / "eval.jsonl", out, show_progress=False)
    assert batch["scored"] == 50 and batch["errors"] == 0
    assert abs(batch["exact_match"] - summary["eval_accuracy"]) <= 0.02, (batch, summary)
    trainer = {r["id"]: r["prediction"] for r in _rows(tmp_path / "run" / "eval_predictions.jsonl")}
    ours = {r["id"]: r["prediction"] for r in _rows(out)}
    agree = sum(trainer[k] == ours[k] for k in trainer)
    assert agree >= 49, f"{agree}/50 predictions agree"
    assert len(set(ours.values())) > 1, "a model that says one word for everything tells nothing here"
