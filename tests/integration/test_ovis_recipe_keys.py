"""A recipe in the Ovis training recipe's own keys trains the tiny Ovis2.5 model, with evaluation and early
stopping, and the run summary says when and why it stopped."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from vltune.training import train  # noqa: E402


def test_ovis_keys_train_eval_and_stop_early(tiny_models, vqa_data, tmp_path):
    out = tmp_path / "out"
    summary = train({
        "model_path": str(tiny_models["ovis2_5"]),
        "data_path": str(vqa_data["train_file"]),
        "eval_data_path": str(vqa_data["eval_file"]),
        "train_modules": "llm|vte:1e-4",
        "multimodal_max_length": 512,
        "single_image_max_pixels": 64 * 64,
        "learning_rate": 1e-3,
        "max_steps": 8,
        "per_device_train_batch_size": 2,
        "eval_steps": 2,
        "num_eval_samples": 4,
        "per_device_eval_batch_size": 4,
        "eval_max_new_tokens": 2,
        "early_stopping_patience": 1,
        "early_stopping_threshold": 1e9,  # no evaluation after the first can improve by that much
        "logging_steps": 1,
        "dataloader_prefetch": 0,
        "output_dir": str(out),
    }, show_progress=False)
    written = json.loads((out / "run_summary.json").read_text())
    assert written == summary
    assert summary["steps"] == 4 and summary["stopped_early_at"] == 4
    assert summary["stop_reason"].startswith("early stopping at step 4: eval_loss did not improve")
    assert "early_stopping_patience 1" in summary["stop_reason"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = next(r for r in rows if "lr_vte" in r)
    assert {k for k in rates if k.startswith("lr_")} == {"lr_llm", "lr_llm_no_decay", "lr_vte"}
    assert rates["lr_vte"] == pytest.approx(rates["lr_llm"] / 10)  # each module's rate, scaled by one schedule
