"""Ulysses sequence parallelism on CPU (gloo, fp32): a packed row split over the ranks of a sequence group
trains exactly as one process training the whole row.

* Every family, one micro-step: the loss of one packed row (two images, a video, text) and every
  gradient equal the single process's (sequence_parallel_worker.py; rank 0 of 2).
* `vltune train --nproc 2` with sequence_parallel_size 2, and `--nproc 4` with 2 x 2 (data x sequence):
  the loss of each of 7 steps and the weights after them equal one process's on the same global batch;
  the data gives video rows, packed rows of two samples and text-only rows (asserted).
* It composes: FSDP2 with gradient checkpointing, ZeRO-3 with LoRA, on the same curve (ZeRO-2 goes the same
  way through DeepSpeed; it was checked once and left out to keep the suite short).
* Wrong settings stop before any model loads, naming the key.
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

from vltune.core.families import FAMILIES  # noqa: E402

STEPS, SEED = 7, 3
LOSS_TOL, WEIGHT_TOL = 1e-5, 3e-5
"""WEIGHT_TOL: after 7 AdamW steps, relative to each tensor's norm. Runs that sum the same gradients in another
order differ by 1e-6 to 1.2e-5 (the vision blocks' biases highest: a few entries whose gradients, sums over
every patch, are fp32 noise that Adam turns into steps of the learning rate), depending on the CPU's
kernels; the per-step losses stay within 2e-7."""
GRAD_TOL, GRAD_ATOL = 1e-4, 1e-6
"""Per tensor, relative to its largest gradient, plus an absolute floor: the Gated DeltaNet's dt_bias / A_log
gradients are sums that cancel to 1e-4 while the loss sum's gradients are O(1), so the same fp32 noise
(3e-7, sums in another order) is large relative to them."""
RUN_TIMEOUT_S = 400
WORKER = Path(__file__).with_name("sequence_parallel_worker.py")
ROW_IDS = ["single-0", "multi-1", "video-2", "text-3"]  # two images' worth of samples, a video, text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    from vltune.data.synthetic_corpus import write_format_corpus

    root = tmp_path_factory.mktemp("sp_corpus")
    files = write_format_corpus(root, num_samples=20, seed=5)  # images, videos, two text-only samples
    texts = [("What is two plus two?", "four"), ("Name a primary color.", "red"), ("Say hello.", "hello")]
    rows = [{"id": f"text_only_{i}", "conversations": [{"from": "human", "value": texts[i % 3][0]},
                                                       {"from": "gpt", "value": texts[i % 3][1]}]}
            for i in range(8)]  # 28 samples: whole global batches of 4 per epoch
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [*files, root / "text.jsonl"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _recipe(path: Path, model_dir: Path, corpus: list[Path], **extra) -> Path:
    recipe = {
        "model_name_or_path": str(model_dir), "dataset_use": ",".join(str(f) for f in corpus),
        "data_flatten": True, "per_device_train_batch_size": 2, "max_steps": STEPS, "learning_rate": 1e-3,
        "lr_scheduler_type": "constant", "logging_steps": 1, "seed": SEED, "tune_mm_vision": True,
        "video_min_frames": 2, "video_max_frames": 4, "model_max_length": 8192, "skip_bad_samples": True, **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- every family, one micro-step ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_steps(tiny_models, corpus, tmp_path_factory) -> Path:
    """One torchrun of 2 ranks running the micro-step of every family (one process start for all)."""
    root = tmp_path_factory.mktemp("sp_families")
    runs = [{"name": f, "recipe": str(_recipe(root / f"{f}.yaml", tiny_models[f], corpus[:1])),
             "ids": ROW_IDS, "sequence_parallel_size": 2} for f in FAMILIES]
    (root / "runs.json").write_text(json.dumps(runs))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
               str(root), str(root / "runs.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_micro_step_equals_one_process(family, family_steps):
    from sequence_parallel_worker import packed_row

    from vltune.backends.torch.distributed import DistContext
    from vltune.backends.torch.parallel import build_backend
    from vltune.core.recipe import load_recipe

    cfg = load_recipe(str(family_steps / f"{family}.yaml"), {})
    info, batch = packed_row(cfg, ROW_IDS)
    assert batch["cu_seqlens"].shape[0] - 1 == len(ROW_IDS) and "pixel_values_videos" in batch and "pixel_values" in batch
    torch.manual_seed(0)
    engine = build_backend(cfg, info, None, None, DistContext())
    loss = float(engine.forward_backward(batch, 1.0))
    sharded = torch.load(family_steps / f"{family}.pt")
    padded = batch["input_ids"].shape[1] + batch["input_ids"].shape[1] % 2
    assert sharded["llm_tokens"] == [padded // 2]  # each rank's language model ran on half the (padded) row
    assert abs(sharded["loss"] - loss) <= LOSS_TOL * abs(loss)
    grads = {name: p.grad for name, p in engine.base.named_parameters() if p.grad is not None}
    assert grads.keys() == sharded["grads"].keys()
    for name, grad in grads.items():
        scale = float(grad.abs().max()) or 1.0
        assert float((sharded["grads"][name] - grad).abs().max()) <= GRAD_TOL * scale + GRAD_ATOL, name


# -- vltune train: 7 steps, 2 ranks (1 x 2) and 4 ranks (2 x 2) ---------------------------------------

def _losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def _weights(out_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(out_dir.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _train(recipe: Path, out_dir: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "vltune.cli", "train", str(recipe), "--output_dir", str(out_dir), "--no-progress", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def cli_runs(tiny_qwen2_5_vl, corpus, tmp_path_factory):
    """name -> output dir, each run made once on first use."""
    root, done = tmp_path_factory.mktemp("sp_cli"), {}
    recipe = _recipe(root / "recipe.yaml", tiny_qwen2_5_vl, corpus)
    lora = _recipe(root / "lora.yaml", tiny_qwen2_5_vl, corpus, train_type="lora", lora_dropout=0.0, max_steps=4)
    # The references run one process through FSDP2 (ZeRO-3 for LoRA): a data-parallel engine runs the vision
    # tower on a text-only step too (VisionSync), so AdamW steps its weights with zero gradients (weight
    # decay, step count), where the plain one-process engine leaves them alone.
    runs = {
        "one": (recipe, ["--fsdp", "true"]),
        "sp2": (recipe, ["--nproc", "2", "--sequence_parallel_size", "2"]),
        "one_accum2": (recipe, ["--fsdp", "true", "--gradient_accumulation_steps", "2"]),
        "dp2_sp2": (recipe, ["--nproc", "4", "--sequence_parallel_size", "2"]),
        "fsdp_gc": (recipe, ["--nproc", "2", "--sequence_parallel_size", "2", "--fsdp", "true",
                             "--gradient_checkpointing", "true", "--max_steps", "4"]),
        "lora_one": (lora, ["--deepspeed", "zero3"]),
        "lora_zero3": (lora, ["--nproc", "2", "--sequence_parallel_size", "2", "--deepspeed", "zero3"]),
    }

    def run(name: str) -> Path:
        if name not in done:
            out = root / name
            _train(runs[name][0], out, *runs[name][1])
            done[name] = out
        return done[name]

    return run


def test_rows_cover_video_packed_and_text_only(corpus):
    """The STEPS rows of the 2-rank run (2-sample rows) include a video row and a text-only row (not so at 6)."""
    from vltune.data.formats import load_samples

    samples = [s for f in corpus for s in load_samples(str(f))]
    order = np.random.default_rng([SEED, 0]).permutation(len(samples))
    rows = [[samples[i] for i in order[2 * r : 2 * r + 2]] for r in range(STEPS)]
    kinds = [{"video" if s.videos else "image" if s.images else "text" for s in row} for row in rows]
    assert any("video" in k for k in kinds) and any(k == {"text"} for k in kinds)


@pytest.mark.parametrize("run, reference", [("sp2", "one"), ("dp2_sp2", "one_accum2")])
def test_training_equals_one_process(cli_runs, run, reference):
    sharded, single = cli_runs(run), cli_runs(reference)
    losses, expected = _losses(sharded), _losses(single)
    assert len(losses) == len(expected) == STEPS
    np.testing.assert_allclose(losses, expected, rtol=LOSS_TOL, atol=0)
    got, want = _weights(sharded), _weights(single)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.endswith("k_proj.bias"):
            # Its gradient is zero in exact arithmetic (a bias added to every key shifts each query's logits by
            # one constant, which softmax ignores), so what it gets is fp32 noise, and Adam makes every noisy
            # gradient a step of about the learning rate: 3e-4 relative after 10 steps, in any pair of
            # runs that sum in different orders. Every other tensor is held to WEIGHT_TOL.
            continue
        # relative to the tensor's norm: Adam also makes near-zero gradient entries (an embedding row seen once,
        # a vision bias) steps of the learning rate (WEIGHT_TOL above)
        assert np.linalg.norm(got[name] - value) <= WEIGHT_TOL * max(np.linalg.norm(value), 1e-12), name


@pytest.mark.parametrize("run, reference", [("fsdp_gc", "one"), ("lora_zero3", "lora_one")])
def test_composes_with_sharding_checkpointing_and_lora(cli_runs, run, reference):
    losses, expected = _losses(cli_runs(run)), _losses(cli_runs(reference))
    np.testing.assert_allclose(losses, expected[: len(losses)], rtol=LOSS_TOL, atol=0)
    assert len(losses) == 4


# -- refusals ---------------------------------------------------------------------------------------

def test_world_size_must_divide(tiny_qwen2_5_vl, corpus, tmp_path):
    """Refused by the launcher, before any worker starts."""
    command = [sys.executable, "-m", "vltune.cli", "train", str(_recipe(tmp_path / "r.yaml", tiny_qwen2_5_vl, corpus)),
               "--output_dir", str(tmp_path / "out"), "--no-progress", "--nproc", "2", "--sequence_parallel_size", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())
    assert result.returncode != 0
    assert "sequence_parallel_size 3 must divide the number of processes (2: --nproc x --nnodes)" in result.stderr
    assert "Traceback" not in result.stderr
