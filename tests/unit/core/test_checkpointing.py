"""Checkpoints that are not whole: a truncated file is found and named before any engine reads it,
`auto` falls back to the newest whole checkpoint, and a full disk says so and leaves no half checkpoint."""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vltune.core.checkpointing import (
    CheckpointError, CheckpointManager, checkpoint_problem, complete_checkpoints, resolve_resume,
)
from vltune.core.config import ConfigError


def _checkpoint(out: Path, step: int) -> Path:
    """A checkpoint with the kinds of files engines write: safetensors weights, a torch (zip) optimizer, JSON."""
    from safetensors.numpy import save_file

    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(path / "model.safetensors"))
    with zipfile.ZipFile(path / "optimizer.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x" * 4096)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "data": {"epoch": 0, "position": step}}))
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"])
def test_auto_skips_a_truncated_newest_checkpoint_and_says_which_and_why(name, tmp_path):
    for step in (4, 8, 12):
        _checkpoint(tmp_path, step)
    _truncate(tmp_path / "checkpoint-12" / name)
    said: list[str] = []
    assert resolve_resume(tmp_path, "auto", log=said.append) == tmp_path / "checkpoint-8"
    assert len(said) == 1 and said[0].startswith("resume_from_checkpoint: auto: skipping checkpoint-12: ")
    assert str(tmp_path / "checkpoint-12" / name) in said[0] and "truncated" in said[0]


def test_an_explicit_broken_checkpoint_is_an_error_naming_the_file(tmp_path):
    _checkpoint(tmp_path, 4)
    _truncate(tmp_path / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'checkpoint-4' / 'optimizer.pt'} is truncated") as e:
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-4"))
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)  # the CLI prints it as one line


def test_auto_with_every_checkpoint_broken_stops(tmp_path):
    for step in (4, 8):
        _truncate(_checkpoint(tmp_path, step) / "model.safetensors", keep=0.0)
    said: list[str] = []
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        resolve_resume(tmp_path, "auto", log=said.append)
    assert [line.split(":")[2].strip() for line in said] == ["skipping checkpoint-8", "skipping checkpoint-4"]


def test_a_whole_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path, 4)) is None


class TwoRanks:
    world_size, is_main = 2, True

    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 801024 vs 800912"),  # torch.save's
], ids=["ENOSPC", "torch-zip-writer"])
@pytest.mark.parametrize("ranks", [None, "two"], ids=["one-rank", "two-ranks"])
def test_a_full_disk_names_the_device_and_leaves_no_temporary_directory(ranks, error, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))  # full
    ckpts = CheckpointManager(tmp_path, ctx=TwoRanks() if ranks else None)

    def write(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"x" * 100)
        raise error

    with pytest.raises(CheckpointError, match=r"^no space left on .*\(mounted at /.*\): checkpoint-3 not written") as e:
        ckpts.save(3, write, {"step": 3, "data": {}})
    assert e.value.__cause__ is error
    assert list(tmp_path.iterdir()) == [] and complete_checkpoints(tmp_path) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def write(directory: Path) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        CheckpointManager(tmp_path).save(3, write, {"step": 3, "data": {}})
    assert list(tmp_path.iterdir()) == []

    short = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 801024 vs 800912")

    def short_write(directory: Path) -> None:  # torch's zip writer, on a disk with room: an I/O error, not a full disk
        raise short

    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        CheckpointManager(tmp_path).save(4, short_write, {"step": 4, "data": {}})


class FailingRank:
    world_size, is_main = 2, False

    def barrier(self) -> None:
        pass


def test_a_failing_rank_other_than_0_leaves_the_shared_temporary_directory_to_rank_0(tmp_path):
    tmp = tmp_path / ".tmp-checkpoint-5"
    tmp.mkdir()  # made by rank 0, which may still be writing its files there
    (tmp / "rank0.bin").write_bytes(b"x")

    def write(directory: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        CheckpointManager(tmp_path, ctx=FailingRank()).save(5, write, {"step": 5, "data": {}})
    assert (tmp / "rank0.bin").exists()


def test_each_checkpoint_carries_its_recipe(tmp_path):
    recipe = {"seed": 3, "learning_rate": 1e-4}
    path = CheckpointManager(tmp_path, recipe=recipe).save(2, lambda d: None, {"step": 2, "data": {}})
    assert json.loads((path / "recipe.json").read_text()) == recipe
