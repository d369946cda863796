"""Ovis2.5 trained end to end on its tiny model (SigLIP2-NaViT tower, visual tokenizer, visual embedding
table, Qwen3 LLM with 1-D positions).

The loss of a padded batch is transformers' own `outputs.loss`; flattened rows (varlen attention in the
LLM and in the tower) and gradient checkpointing change the layout and the memory, not the loss curve;
DDP, ZeRO-0 to 3 and FSDP2 on 2 CPU processes give the one-process curve of the same global batch (the
data mixes text-only samples in, so ranks meet micro-steps without an image). (A packed row's
per-sample exactness is in tests/unit/backends/test_packing_torch.py, which runs every family.)
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

torch = pytest.importorskip("torch")

from vltune.backends.torch.batch import to_model_inputs  # noqa: E402
from vltune.backends.torch.engine import Engine  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.config import ModelArgs, TrainArgs  # noqa: E402
from vltune.data.chat import ChatTokenizer  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402
from vltune.training import train  # noqa: E402

OVIS = "ovis2_5"
STEPS, RUN_TIMEOUT_S = 6, 300


@pytest.fixture(scope="module")
def ovis_dir(tiny_models) -> Path:
    return tiny_models[OVIS]


def test_padded_batch_loss_equals_transformers(ovis_dir, vqa_data):
    samples = load_samples(vqa_data["train_file"])[:3]
    dataset = SFTDataset(samples, ovis_dir, max_length=4096, max_pixels=200 * 200)
    features = [dataset[i] for i in range(3)]
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)(features)
    assert batch["attention_mask"].min() == 0, "rows of different lengths: the batch is padded"
    engine = Engine(load_model(ovis_dir), ovis_dir, dataset.info, ModelArgs(model_name_or_path=str(ovis_dir)), TrainArgs())
    loss_sum, n = engine.eval_loss(batch)
    reference = load_model(ovis_dir).eval()
    inputs = to_model_inputs(batch, torch.device("cpu"), model=reference)
    assert inputs["position_ids"].shape == batch["input_ids"].shape  # 1-D positions reach the Qwen3 LLM
    with torch.no_grad():
        theirs = reference(**inputs, labels=torch.as_tensor(batch["labels"]), use_cache=False).loss
    assert abs(loss_sum / n - float(theirs)) <= 1e-5


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def recipe(ovis_dir, mixed_jsonl) -> dict:
    return {
        "model_name_or_path": str(ovis_dir), "dataset_use": str(mixed_jsonl(12)), "tune_mm_vision": True,
        "max_pixels": 12544, "model_max_length": 512, "max_steps": STEPS, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
        "seed": 3,
    }


@pytest.fixture(scope="module")
def padded_run(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("padded") / "out"
    train({**recipe, "save_steps": 3, "output_dir": str(out)}, show_progress=False)
    return out


def test_resume_from_step_3_is_bit_exact(recipe, padded_run, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "resumed"
    summary = train({**recipe, "save_steps": 3, "output_dir": str(out),
                     "resume_from_checkpoint": str(padded_run / "checkpoint-3")}, show_progress=False)
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert _losses(out) == _losses(padded_run)[3:]
    ours, straight = load_file(out / "model.safetensors"), load_file(padded_run / "model.safetensors")
    assert ours.keys() == straight.keys() and all(np.array_equal(ours[k], straight[k]) for k in ours)


def test_flattened_checkpointed_rows_train_as_the_padded_batches(recipe, padded_run, tmp_path):
    flat = tmp_path / "flat"
    train({**recipe, "data_flatten": True, "gradient_checkpointing": True, "output_dir": str(flat)}, show_progress=False)
    assert len(_losses(padded_run)) == STEPS
    np.testing.assert_allclose(_losses(flat), _losses(padded_run), rtol=1e-5)


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("engine", [[], *(["--deepspeed", f"zero{n}"] for n in range(4)), ["--fsdp", "true"]],
                         ids=["ddp", "zero0", "zero1", "zero2", "zero3", "fsdp2"])
def test_two_ranks_match_one_process(engine, recipe, padded_run, tmp_path):
    """Each rank's micro-batch is 1 sample, the one-process run's 2: the same global batch."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "per_device_train_batch_size": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "vltune.cli", "train", str(path), "--output_dir", str(out), "--no-progress",
               "--nproc", "2", *engine]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    np.testing.assert_allclose(_losses(out), _losses(padded_run), rtol=1e-4)


def test_greedy_answer_equals_a_full_recompute_without_cache(ovis_dir, vqa_data):
    """`vltune infer`'s generation (transformers' generate with its KV cache and 1-D positions from the
    attention mask) against the argmax of a whole forward per step over the same prompt."""
    from vltune.core.generation import GenerationSettings
    from vltune.inference import answer_prompt

    sample = load_samples(vqa_data["eval_file"])[0]
    steps = 6
    answer = answer_prompt(ovis_dir, "Which color?", [str(sample.images[0])], settings=GenerationSettings(max_new_tokens=steps))
    dataset = SFTDataset([sample], ovis_dir, max_length=4096)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which color?"}]}]
    features = dataset[0]
    chat = ChatTokenizer(ovis_dir, {"enable_thinking": False})  # as `vltune infer` without --thinking renders it
    ids = chat.encode_prompt(messages, [chat.image_placeholder(int(features.image_grid_thw.prod()) // 4)])
    assert chat.decode(ids[-6:], skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    model = load_model(ovis_dir).eval()
    vision = {"pixel_values": torch.as_tensor(features.pixel_values), "image_grid_thw": torch.as_tensor(features.image_grid_thw)}
    row = torch.as_tensor(ids)[None]
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=row, **vision, use_cache=False).logits[0, -1].argmax()
            row = torch.cat([row, token.view(1, 1)], dim=1)
            if int(token) in (dataset.tokenizer.im_end_id, dataset.tokenizer.pad_token_id):
                break
    expected = dataset.tokenizer.decode(row[0, len(ids):].tolist()).strip()
    assert answer.prediction == expected and answer.generated_tokens >= 1
