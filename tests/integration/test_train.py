"""The thin path through every floor: `vltune train` on the tiny model, and what it leaves on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402
from vltune.core.families import FAMILIES  # noqa: E402
from vltune.core.untrained_weights import CARRIED_FILE  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


def _vltune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vltune.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def short_run(request, tmp_path_factory, tiny_model_dirs) -> tuple[Path, dict]:
    """Six steps of the demo recipe on each tiny model family, through the real command."""
    work = tmp_path_factory.mktemp("run")
    model_dir = tiny_model_dirs.get(request.param) or request.getfixturevalue("tiny_qwen2_vl")
    proc = _vltune(
        "train", "demo", "--no-progress",
        "--model_name_or_path", str(model_dir), "--make_tiny_model", "none",
        "--synthetic_vqa", "{out_dir: data, num_train: 64, num_eval: 8, tasks: [color, shape], seed: 3}",
        "--dataset_use", "data/train.jsonl", "--eval_dataset", "data/eval.jsonl",
        "--max_steps", "6", "--logging_steps", "2", "--eval_steps", "3", "--per_device_train_batch_size", "4",
        "--output_dir", "out", "--seed", "3",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return work, summary


def test_summary_is_the_last_stdout_line(short_run):
    work, summary = short_run
    for key in ("eval_accuracy", "train_loss", "steps", "tokens_per_s", "output_dir", "eval_file"):
        assert key in summary, key
    assert summary["steps"] == 6 and summary["tokens_per_s"] > 0
    assert (work / summary["eval_file"]).exists()
    assert summary["eval_data"]["samples_ok"] == 8 and summary["eval_data"]["samples_dropped"] == 0  # eval counts, as the train ones


def test_metrics_rows(short_run):
    work, _ = short_run
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    eval_rows = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in eval_rows] == [3, 6]


def test_saved_model_gives_the_same_loss_in_plain_transformers(short_run):
    """Load the trained output with AutoModelForImageTextToText and the stock loss; compare with vltune's."""
    work, summary = short_run
    out = work / summary["output_dir"]
    cfg = load_recipe("demo", {"model_name_or_path": str(out), "make_tiny_model": "none"})
    samples = load_samples(work / "data" / "eval.jsonl")[:4]
    dataset = SFTDataset(samples, out, max_length=256, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    batch = collate_padded([dataset[i] for i in range(4)], dataset.info, dataset.tokenizer.pad_token_id)

    backend = TorchBackend(load_model(out), out, dataset.info, cfg.model, cfg.train)
    loss_sum, count = backend.eval_loss(batch)
    ours = loss_sum / count

    stock = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    ids = torch.as_tensor(batch["input_ids"])
    with torch.no_grad():
        theirs = stock(
            input_ids=ids,
            attention_mask=torch.as_tensor(batch["attention_mask"]),
            pixel_values=torch.as_tensor(batch["pixel_values"]),
            image_grid_thw=torch.as_tensor(batch["image_grid_thw"]),
            mm_token_type_ids=(ids == stock.config.image_token_id).int(),
            labels=torch.as_tensor(batch["labels"]),
        ).loss.item()
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


def test_saved_weights_are_the_trained_ones(short_run, tiny_model_dirs, request):
    from safetensors.numpy import load_file

    work, summary = short_run
    out = work / summary["output_dir"]
    trained = load_file(out / "model.safetensors")
    initial_dir = tiny_model_dirs.get(summary["model_type"]) or request.getfixturevalue("tiny_qwen2_vl")
    initial = load_file(initial_dir / "model.safetensors")
    # tensors the model does not load (Qwen3.5's mtp.*) are not trained: carried over unchanged, bit for bit
    untrained = tuple(FAMILIES[summary["model_type"]].untrained_prefixes)
    carried = {k for k in initial if untrained and k.startswith(untrained)}
    assert trained.keys() == initial.keys() - carried
    changed = [k for k in trained if not np.array_equal(trained[k], initial[k])]
    assert len(changed) == len(trained), "every tensor trains in full fine-tuning with all tune_mm_* on"
    if carried:
        kept = load_file(out / CARRIED_FILE)
        assert kept.keys() == carried and all(np.array_equal(kept[k], initial[k]) for k in carried)
    else:
        assert not (out / CARRIED_FILE).exists()


def test_cli_errors(tmp_path):
    proc = _vltune("train", "demo", "--learning_rat", "1e-3", cwd=tmp_path)
    assert proc.returncode == 1 and "did you mean 'learning_rate'" in proc.stderr
    proc = _vltune("pack", cwd=tmp_path)
    assert proc.returncode == 2 and "--pack-length" in proc.stderr  # argparse: the required arguments
    proc = _vltune("train", "demo", "--synthetic_vqa", "{out_dir: d, colours: 3}", cwd=tmp_path)
    assert proc.returncode == 1 and "synthetic_vqa" in proc.stderr and "Traceback" not in proc.stderr
    proc = _vltune("train", "demo", "--synthetic_vqa", "none", "--dataset_use", "my_dataset%50", cwd=tmp_path)
    assert proc.returncode == 1 and "not a registered name" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "s1", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>Q"}, '
                   '{"from": "gpt", "value": "A"}]}\n')
    proc = _vltune("train", "demo", "--synthetic_vqa", "none", "--dataset_use", str(bad), "--eval_dataset", "none",
                   "--make_tiny_model", "none", "--model_name_or_path", str(tmp_path / "no-model"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "model directory" in proc.stderr and "no-model does not exist" in proc.stderr


def test_missing_image_names_the_sample(tmp_path, tiny_qwen2_5_vl):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "s1", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>Q"}, '
                   '{"from": "gpt", "value": "A"}]}\n')
    proc = _vltune("train", "demo", "--synthetic_vqa", "none", "--dataset_use", str(bad), "--eval_dataset", "none",
                   "--make_tiny_model", "none", "--model_name_or_path", str(tiny_qwen2_5_vl),
                   "--per_device_train_batch_size", "1", "--output_dir", "out", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bad.jsonl:1 (id s1)" in proc.stderr and "missing.png" in proc.stderr and "file not found" in proc.stderr


def test_infer_command_equals_stock_transformers_generate(short_run):
    """`vltune infer` (data/ preprocessing + torch backend) vs transformers' tokenizer, image processor and generate."""
    from PIL import Image

    work, summary = short_run
    out = work / summary["output_dir"]
    sample = json.loads((work / summary["eval_file"]).read_text().splitlines()[0])
    image = work / "data" / sample["image"]
    prompt = "What color is the shape?"
    proc = _vltune(
        "infer", "--model", str(out), "--image", str(image), "--prompt", prompt,
        "--max-new-tokens", "5", "--max-pixels", "12544", cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    image_processor = transformers.AutoImageProcessor.from_pretrained(out, max_pixels=12544)
    vision = image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"].prod()) // 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    # vltune infer renders enable_thinking=False without --thinking (Qwen3.5's template then answers directly)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens), return_tensors="pt")["input_ids"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    generated = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == model.config.image_token_id).int(),
        pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"], max_new_tokens=5, do_sample=False,
    )
    expected = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert proc.stdout.strip().splitlines()[-1:] == ([expected.strip()] if expected.strip() else [])
