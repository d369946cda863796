"""The torchrun command `vltune train --nproc` builds, the DeepSpeed JSON it resolves from a recipe, and how a worker ends."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from vltune.cli import main
from vltune.core.config import RECIPE_DIR, ConfigError, TrainArgs
from vltune.core.recipe import load_recipe

pytest.importorskip("torch")


def test_print_launch_single_node(capsys, monkeypatch, tmp_path):
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: /m\ndataset_use: /d.jsonl\n")
    assert main(["train", str(recipe), "--nproc", "4", "--print-launch", "--max_steps", "3", "--deepspeed", "zero2"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:6] == ["--nproc_per_node", "4", "--standalone"]
    # Workers re-run the same recipe and overrides, without the launch flags.
    assert command[6:] == ["-m", "vltune.cli", "train", str(recipe), "--max_steps", "3", "--deepspeed", "zero2"]


def test_print_launch_multi_node(capsys, monkeypatch, tmp_path):
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: /m\ndataset_use: /d.jsonl\n")
    argv = ["train", str(recipe), "--nproc", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
            "--master_port", "29600", "--print-launch"]
    assert main(argv) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    flags = dict(zip(command[3:13:2], command[4:13:2]))
    assert flags == {"--nproc_per_node": "8", "--nnodes": "2", "--node_rank": "1", "--master_addr": "10.0.0.1", "--master_port": "29600"}
    assert "--standalone" not in command


def test_launch_errors_are_one_line(capsys, monkeypatch, tmp_path):
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: /m\ndataset_use: /d.jsonl\n")
    assert main(["train", str(recipe), "--nproc", "2", "--nnodes", "2", "--print-launch"]) == 1
    assert "--master_addr" in capsys.readouterr().err
    # A bad recipe fails once, in the launcher, before any worker starts.
    assert main(["train", str(recipe), "--nproc", "2", "--print-launch", "--learning_rat", "1"]) == 1
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def _recipe(**extra):
    return {"model_name_or_path": "/m", "dataset_use": "/d.jsonl", **extra}


def test_deepspeed_key_resolves_bundled_configs():
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        assert load_recipe(_recipe(deepspeed=name)).train.deepspeed == name
    assert load_recipe(_recipe(deepspeed="recipes/deepspeed/zero3.json")).train.deepspeed  # package-relative path


def test_deepspeed_config_problems(tmp_path):
    with_optimizer = tmp_path / "opt.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as e:
        load_recipe(_recipe(deepspeed=str(with_optimizer), fsdp=True))
    message = str(e.value)
    assert "'optimizer' block" in message and "per-module groups" in message
    assert "deepspeed and fsdp are both set" in message
    with pytest.raises(ConfigError, match="neither a JSON file nor a bundled config"):
        load_recipe(_recipe(deepspeed="zero9"))


def test_deepspeed_auto_values_come_from_the_recipe(tmp_path):
    from vltune.backends.torch.parallel import deepspeed_config

    args = TrainArgs(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5)
    cfg = deepspeed_config(RECIPE_DIR / "deepspeed" / "zero3.json", args, world_size=8, hidden_size=64, bf16=True)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 4, 64)
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    zero2 = deepspeed_config(RECIPE_DIR / "deepspeed" / "zero2.json", args, 8, 64, bf16=True)["zero_optimization"]
    assert zero2["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default: few buckets, measured faster
    offload = deepspeed_config(RECIPE_DIR / "deepspeed" / "zero3_offload.json", args, 8, 64, bf16=True)
    assert offload["zero_force_ds_cpu_optimizer"] is False  # vltune's torch AdamW runs on the offloaded state

    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4 .* the recipe gives 2"):
        deepspeed_config(fixed, args, 8, 64, bf16=False)


def test_exit_worker_runs_atexit_flushes_and_keeps_the_code(tmp_path):
    """A finished worker skips only the interpreter teardown: its atexit handlers still run, buffered
    output still arrives, and the exit code is the one given."""
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, pathlib, sys\n"
        "from vltune.backends.torch.launch import exit_worker\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "sys.stdout.write('summary line without a newline')\n"
        "try:\n"
        "    exit_worker(3)\n"
        "except SystemExit:\n"
        "    print('raised SystemExit')\n"  # sys.exit would pass the rest of this test; os._exit does not unwind
        "finally:\n"
        "    print('unwound')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "summary line without a newline"
    assert marker.read_text() == "yes"
