"""One run per output_dir (a lock the kernel drops with its process), and what a new run does with the
checkpoints it finds there: refuse a fresh start over them, remove them when told, resume only its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vltune.core.config import ConfigError, RecipeConfig
from vltune.core.run_dir import LOCK_FILE, OutputDirLock, claim_output_dir


class Rank:
    """A rank of a run as claim_output_dir sees it; `steps`: what all_reduce would hand back."""

    def __init__(self, rank: int = 0, world_size: int = 1, reduced: list[float] | None = None):
        self.rank, self.world_size, self.reduced, self.barriers = rank, world_size, reduced, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.barriers += 1

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        assert op == "max"
        return self.reduced if self.reduced is not None else values


def _cfg(out: Path, **train) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.model.model_name_or_path, cfg.data.dataset_use = "/models/tiny", "/data/train.jsonl"
    cfg.train.output_dir, cfg.train.seed, cfg.train.max_steps = str(out), 11, 20
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _checkpoint(out: Path, step: int, recipe: dict | None = None) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "data": {"epoch": 0, "position": step}}))
    if recipe is not None:
        (path / "recipe.json").write_text(json.dumps(recipe))
    return path


def test_a_second_process_is_refused_and_named_until_the_first_dies(tmp_path):
    """Two real processes: the holder's pid and host are in the refusal; a SIGKILLed holder holds nothing."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom vltune.core.run_dir import OutputDirLock\n"
         "OutputDirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"another run is writing there \\(pid {holder.pid} on host {socket.gethostname()}"):
            OutputDirLock(tmp_path).acquire()
        OutputDirLock(tmp_path, enabled=False).acquire()  # a rank other than 0 of the same run takes no lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: nobody named


def test_one_process_runs_into_one_directory_one_after_the_other(tmp_path):
    first = OutputDirLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        OutputDirLock(tmp_path).acquire()
    first.release()
    with OutputDirLock(tmp_path):
        pass


def test_a_fresh_run_over_checkpoints_is_refused_or_overwrites_them(tmp_path, capsys):
    out = tmp_path / "out"
    _checkpoint(out, 8)
    (out / ".tmp-checkpoint-10").mkdir()
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(checkpoint-8\).*overwrite_output_dir: true"):
        claim_output_dir(_cfg(out), Rank())
    assert claim_output_dir(_cfg(out, overwrite_output_dir=True), Rank()) is None
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json"]
    assert "removed 2 checkpoint directories of an earlier run" in capsys.readouterr().out
    # `auto` under overwrite_output_dir does not resume either.
    _checkpoint(out, 8)
    assert claim_output_dir(_cfg(out, overwrite_output_dir=True, resume_from_checkpoint="auto"), Rank()) is None
    assert not (out / "checkpoint-8").exists()


def test_auto_with_nothing_to_resume_says_so_and_starts_fresh(tmp_path, capsys):
    assert claim_output_dir(_cfg(tmp_path / "out", resume_from_checkpoint="auto"), Rank()) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[vltune] resume_from_checkpoint: auto: no checkpoint in {tmp_path / 'out'}; starting a fresh run"]
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["seed"] == 11


def test_only_a_checkpoint_of_the_same_recipe_is_resumed(tmp_path):
    out = tmp_path / "out"
    recipe = _cfg(out).to_flat_dict()
    _checkpoint(out, 8, {**recipe, "seed": 12, "learning_rate": 1e-3, "dataset_use": "/data/other.jsonl"})
    with pytest.raises(ConfigError, match=r"checkpoint-8 was trained with another recipe \(dataset_use: '/data/other.jsonl' -> "
                       r"'/data/train.jsonl'; seed: 12 -> 11; learning_rate: 0.001 -> 1e-05\)"):
        claim_output_dir(_cfg(out, resume_from_checkpoint="auto"), Rank())
    # Keys that may change on resume: more steps, another output_dir, other logging and save cadence, workers.
    allowed = {**recipe, "max_steps": 8, "output_dir": "elsewhere", "logging_steps": 5, "save_steps": 2,
               "dataloader_num_workers": 4, "resume_from_checkpoint": None, "num_train_epochs": 3.0}
    (out / "checkpoint-8" / "recipe.json").write_text(json.dumps(allowed))
    assert claim_output_dir(_cfg(out, resume_from_checkpoint="auto"), Rank()) == out / "checkpoint-8"


def test_an_older_checkpoint_without_its_own_recipe_is_compared_with_its_runs(tmp_path):
    """Checkpoints written before they carried recipe.json: the run's own, read before this run rewrites it."""
    out = tmp_path / "out"
    _checkpoint(out, 4)
    (out / "recipe.json").write_text(json.dumps({**_cfg(out).to_flat_dict(), "seed": 5}))
    with pytest.raises(ConfigError, match="seed: 5 -> 11"):
        claim_output_dir(_cfg(out, resume_from_checkpoint="auto"), Rank())
    assert json.loads((out / "recipe.json").read_text())["seed"] == 5  # not overwritten by the refused run


def test_ranks_agree_and_only_rank_0_writes(tmp_path, capsys):
    out = tmp_path / "out"
    _checkpoint(out, 4, _cfg(out).to_flat_dict())
    rank1 = Rank(rank=1, world_size=2)
    assert claim_output_dir(_cfg(out, resume_from_checkpoint="auto"), rank1) == out / "checkpoint-4"
    assert rank1.barriers == 2 and not (out / "recipe.json").exists() and capsys.readouterr().out == ""
    # Ranks that read the directory differently (a file system that nodes see differently) stop.
    with pytest.raises(ConfigError, match="different checkpoints to resume"):
        claim_output_dir(_cfg(out, resume_from_checkpoint="auto"), Rank(world_size=2, reduced=[4.0, 1.0]))
