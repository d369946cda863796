"""Checkpoint directories: written whole or not at all, rotated, found again on resume.

A checkpoint is `OUTPUT_DIR/checkpoint-STEP/`. It is first written to `OUTPUT_DIR/.tmp-checkpoint-STEP`
(engine files, then `trainer_state.json` last) and renamed into place in one `os.rename`, so a run
killed at any moment leaves only complete checkpoints behind; resume ignores temporary directories.
The engine writes its own files (weights, optimizer, RNG); this module owns the directory life cycle,
which is the same for every backend.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoint directories of a run, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and (path / TRAINER_STATE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """`auto` -> the newest complete checkpoint of output_dir (or None); a path -> that checkpoint."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    return path


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


class CheckpointManager:
    """save(step, ...) and rotation under save_total_limit, never deleting the best checkpoint."""

    def __init__(self, output_dir: str | Path, save_total_limit: int | None = None):
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit

    def save(self, step: int, write_engine_files: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_engine_files(tmp)
        self._write_trainer_state(tmp, trainer_state)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. best at the last step): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.output_dir)
        self._rotate(keep=trainer_state.get("best_checkpoint"))
        return final

    @staticmethod
    def _write_trainer_state(directory: Path, trainer_state: dict[str, Any]) -> None:
        (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")

    def _rotate(self, keep: str | None) -> None:
        if not self.save_total_limit:
            return
        found = complete_checkpoints(self.output_dir)
        removable = [p for p in found if keep is None or p.name != Path(keep).name]
        excess = len(found) - self.save_total_limit
        for path in removable[: max(0, excess)]:
            shutil.rmtree(path)


class RankContext(Protocol):
    """What a multi-process run tells the checkpoint manager (each backend's DistContext has it)."""

    world_size: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


class DistributedCheckpointManager(CheckpointManager):
    """CheckpointManager whose directory life cycle runs on rank 0 while every rank writes its files.

    Sharded engines (ZeRO-3, FSDP2) must gather on all ranks to save a model, ZeRO writes one optimizer
    shard per rank, and every rank keeps its own RNG streams; so every rank calls `write_engine_files`
    on the same temporary directory, between barriers. Rank 0 alone creates it, writes
    trainer_state.json last, renames it into place and rotates old checkpoints, so a checkpoint still
    appears whole or not at all. Backend-neutral: `ctx` is the torch or the MindSpore DistContext.
    """

    def __init__(self, output_dir: str | Path, save_total_limit: int | None, ctx: RankContext):
        super().__init__(output_dir, save_total_limit)
        self.ctx = ctx

    def save(self, step: int, write_engine_files: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        if self.ctx.world_size == 1:
            return super().save(step, write_engine_files, trainer_state)
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.ctx.barrier()
        write_engine_files(tmp)
        self.ctx.barrier()  # every rank's files are on disk before the rename makes them a checkpoint
        if self.ctx.is_main:
            self._write_trainer_state(tmp, trainer_state)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._rotate(keep=trainer_state.get("best_checkpoint"))
        self.ctx.barrier()
        return final


def write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` on a fresh folder inside `out_dir`, then move every file it made into `out_dir`:
    a run killed while writing leaves the files that were there before, never a half-written one. Both
    engines save models and adapters through this one writer (checkpoint directories as a whole go
    through CheckpointManager's rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out_dir))
    try:
        write(tmp)
        for path in tmp.iterdir():
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
