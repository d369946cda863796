"""`vltune pack` at scale, and training on flattened / packed rows through `vltune.train`."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from vltune.cli import main  # noqa: E402
from vltune.training import train  # noqa: E402

WORDS = "the a red blue green small large circle square image shows left right top bottom of in".split()


def _text_records(n: int, seed: int = 0) -> list[dict]:
    """Text-only conversations whose lengths follow a long tail (lognormal words: median ~110, 1% past 1.5k, a few past 4k)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = int(np.clip(rng.lognormal(4.7, 1.1), 3, 6000))
        ask = max(1, words // 4)
        out.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": " ".join(rng.choice(WORDS, ask))},
            {"from": "gpt", "value": " ".join(rng.choice(WORDS, words - ask + 1))},
        ]})
    return out


@pytest.mark.slow
def test_vltune_pack_10k_long_tailed_samples(tiny_qwen2_5_vl, tmp_path, capsys):
    annotation = tmp_path / "sft.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in _text_records(10_000)))
    args = ["pack", str(annotation), "--pack-length", "4096", "--model", str(tiny_qwen2_5_vl), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(f"\nvltune pack, 10k samples: {summary}")
    assert summary["samples"] == 10_000 and summary["efficiency"] >= 0.97
    assert summary["oversize"] > 0, "the tail reaches past the pack length"
    assert {"efficiency", "bins", "samples", "oversize", "seconds"} <= summary.keys()
    packs = json.loads((tmp_path / "sft_packed4096.json").read_text())
    assert sum(len(p) for p in packs) == 10_000 and len(packs) == summary["bins"]
    assert main(args[:3] + ["2048"] + args[4:]) == 0  # another length: every count from the cache
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] == 10_000 and again["seconds"] < summary["seconds"]


def _recipe(model_dir, vqa_data, out, **extra) -> dict:
    return {
        "model_name_or_path": str(model_dir), "dataset_use": vqa_data["train_file"], "tune_mm_vision": True,
        "max_pixels": 12544, "min_pixels": 3136, "model_max_length": 256, "output_dir": str(out),
        "max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3, "logging_steps": 1, "seed": 3, **extra,
    }


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_flattened_rows_train_as_the_padded_batch(tiny_qwen2_5_vl, vqa_data, tmp_path):
    """data_flatten changes the layout, not the objective: the same micro-batches give the same
    accumulated loss (mean over the trained tokens of the whole step), step after step."""
    padded = train(_recipe(tiny_qwen2_5_vl, vqa_data, tmp_path / "padded"), show_progress=False)
    flat = train(_recipe(tiny_qwen2_5_vl, vqa_data, tmp_path / "flat", data_flatten=True), show_progress=False)
    assert padded["steps"] == flat["steps"] == 2
    np.testing.assert_allclose(_losses(tmp_path / "flat"), _losses(tmp_path / "padded"), rtol=1e-5)


def test_packed_file_and_token_budget_rows_train(tiny_qwen2_5_vl, vqa_data, tmp_path, capsys):
    assert main(["pack", vqa_data["train_file"], "--pack-length", "200", "--model", str(tiny_qwen2_5_vl),
                 "--max-pixels", "12544", "--min-pixels", "3136", "--output", str(tmp_path / "packed"), "--no-cache"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 48 and summary["bins"] < 48
    # The packed file's media paths stay relative to the original folder: register both.
    datasets = {"vqa_packed": {"annotation_path": str(tmp_path / "packed.json"), "data_path": summary["data_path"]}}
    for name, extra in (
        ("packed", {"data_packing": True, "dataset_use": "vqa_packed", "datasets": datasets, "per_device_train_batch_size": 1}),
        ("budget", {"data_flatten": True, "max_tokens_per_batch": 300}),
    ):
        result = train(_recipe(tiny_qwen2_5_vl, vqa_data, tmp_path / name, **extra), show_progress=False)
        losses = _losses(tmp_path / name)
        assert result["steps"] == 2 and len(losses) == 2 and all(np.isfinite(losses)), name
    # The token-budget rows again, each built and packed in a worker process: the very same losses.
    train(_recipe(tiny_qwen2_5_vl, vqa_data, tmp_path / "workers", data_flatten=True, max_tokens_per_batch=300,
                  dataloader_num_workers=2), show_progress=False)
    assert _losses(tmp_path / "workers") == _losses(tmp_path / "budget")
