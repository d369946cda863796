"""The msrun command `vltune train --backend mindspore --nproc` builds and prints, and the exact
float64 sums the MindSpore data-parallel context moves through float32-only collectives."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from vltune.backends.mindspore.launch import launch_env, rank0_summary
from vltune.cli import main

BIN_DIR = str(Path(sys.executable).parent)


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    for var in ("MS_ROLE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(f"model_name_or_path: /m\ndataset_use: /d.jsonl\noutput_dir: {tmp_path / 'run'}\n")
    return path


def _printed(capsys) -> tuple[str, list[str], dict[str, str], list[str]]:
    """(PATH assignment, msrun executable, msrun flags, the worker command) of the printed line."""
    tokens = shlex.split(capsys.readouterr().out.strip())
    path, tokens = tokens[0], tokens[1:]
    worker = tokens.index("python")
    launcher = tokens[:1] if tokens[0] == "msrun" else tokens[:3]
    flags = tokens[len(launcher) : worker]
    return path, launcher, dict(zip(flags[0::2], flags[1::2])), tokens[worker:]


def test_print_launch_multi_node(capsys, recipe, tmp_path):
    argv = ["train", str(recipe), "--backend", "mindspore", "--nproc", "8", "--nnodes", "2", "--node_rank", "1",
            "--master_addr", "10.0.0.1", "--master_port", "29600", "--print-launch", "--max_steps", "3"]
    assert main(argv) == 0
    path, launcher, flags, worker = _printed(capsys)
    # msrun starts `python` from PATH: this interpreter's directory comes first.
    assert path == f"PATH={BIN_DIR}:$PATH"
    assert launcher in (["msrun"], [sys.executable, "-m", "mindspore.parallel.cluster.run"])
    assert flags == {
        "--worker_num": "16", "--local_worker_num": "8", "--master_addr": "10.0.0.1", "--master_port": "29600",
        "--node_rank": "1", "--log_dir": str(tmp_path / "run" / "msrun_log"), "--join": "True",
    }
    # Workers re-run the same recipe and overrides (the backend override included), without the launch flags.
    assert worker == ["python", "-m", "vltune.cli", "train", str(recipe), "--backend", "mindspore", "--max_steps", "3"]


def test_print_launch_single_node_takes_a_free_local_port(capsys, recipe):
    recipe.write_text(recipe.read_text() + "backend: mindspore\n")
    assert main(["train", str(recipe), "--nproc", "2", "--print-launch"]) == 0
    _, _, flags, worker = _printed(capsys)
    assert (flags["--worker_num"], flags["--local_worker_num"], flags["--node_rank"]) == ("2", "2", "0")
    assert flags["--master_addr"] == "127.0.0.1" and 1024 <= int(flags["--master_port"]) <= 65535
    assert worker == ["python", "-m", "vltune.cli", "train", str(recipe)]


def test_backend_picks_the_launcher(capsys, recipe):
    """The same recipe launches with torchrun for backend torch and msrun for backend mindspore."""
    assert main(["train", str(recipe), "--nproc", "2", "--print-launch"]) == 0
    assert "torch.distributed.run" in capsys.readouterr().out
    assert main(["train", str(recipe), "--nproc", "2", "--print-launch", "--backend", "mindspore"]) == 0
    assert "--local_worker_num 2" in capsys.readouterr().out


def test_launch_errors(capsys, recipe, monkeypatch):
    assert main(["train", str(recipe), "--backend", "mindspore", "--nproc", "2", "--nnodes", "2", "--print-launch"]) == 1
    assert "--master_addr" in capsys.readouterr().err
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")  # an msrun worker given --nproc again must not launch again
    assert main(["train", str(recipe), "--backend", "mindspore", "--nproc", "2", "--print-launch"]) == 1
    assert "already inside an msrun worker" in capsys.readouterr().err


def test_launch_env_puts_this_python_first():
    env = launch_env("/opt/venv/bin/python", base={"PATH": "/usr/bin:/bin", "HOME": "/h"})
    assert env == {"PATH": "/opt/venv/bin:/usr/bin:/bin", "HOME": "/h"}


def test_rank0_summary_is_the_last_json_line_of_rank_0(tmp_path):
    log = tmp_path / "worker_0.log"
    log.write_text('[vltune] step 1\n{"steps": 1, "train_loss": 9.0}\n{"steps": 3, "train_loss": 2.5}\n'
                   "[INFO] DISTRIBUTED ... Event base dispatch success!\n{not json}\n")
    assert rank0_summary(tmp_path) == {"steps": 3, "train_loss": 2.5}
    assert rank0_summary(tmp_path / "absent") is None


def test_split_float32_carries_float64_sums_exactly():
    """CPU AllReduce takes float32 only: 2**24 + 1 tokens would round. The three float32 parts that
    AllGather copies add up, per rank and summed over ranks in float64, to the exact values."""
    pytest.importorskip("mindspore")
    from vltune.backends.mindspore.distributed import split_float32

    rank0 = np.array([2.0**24 + 1, 4.123456789012345, 1234.5678901234, 7.0])
    rank1 = np.array([3.0, 1e-3, 8765.4321098765, float("nan")])
    assert float(np.float32(rank0[0])) != rank0[0]  # what a float32 all-reduce would lose
    parts = np.stack([split_float32(rank0), split_float32(rank1)])
    assert parts.dtype == np.float32
    per_rank = parts.astype(np.float64).sum(axis=2)
    np.testing.assert_array_equal(per_rank[0], rank0)
    total = per_rank.sum(axis=0)
    np.testing.assert_array_equal(total[:3], rank0[:3] + rank1[:3])
    assert np.isnan(total[3])
    assert np.isinf(split_float32(np.array([float("inf")])).astype(np.float64).sum())
