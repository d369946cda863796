"""A run's output directory: one run at a time, and what a new run finds there before writing.

Two runs into one output_dir would interleave metrics.jsonl and overwrite each other's checkpoints, so a
run holds `OUTPUT_DIR/.vltune.lock` (an flock, which the kernel drops when its process ends however it
ends: the lock of a killed run is no lock) and names itself in it; a second run is refused with the
first one's pid and host. Only the main process of a run (rank 0) takes it, so the ranks of one run never
refuse each other.

A fresh run into a directory holding checkpoints is refused too (unless `overwrite_output_dir`), because a
later `resume_from_checkpoint: auto` would resume the other run's newest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from .checkpointing import RECIPE_FILE, RankContext, complete_checkpoints, read_trainer_state, resolve_resume
from .config import ConfigError, RecipeConfig

LOCK_FILE = ".vltune.lock"
_CHECKPOINT_DIR = re.compile(r"(\.tmp-)?checkpoint-\d+")
"""What overwrite_output_dir removes: finished and half-written checkpoints, nothing else of the user's."""


class OutputDirLock:
    """An exclusive, non-blocking flock on OUTPUT_DIR/.vltune.lock while a run writes there.

    `enabled=False` (ranks other than 0) makes it a no-op. The file stays (removing it would let a third
    run lock a new file while the second still holds the old one); it is emptied on release."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.enabled = enabled
        self._fd: int | None = None

    def acquire(self) -> None:
        if not self.enabled or self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:  # the run's first write into output_dir
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by spawned workers
        except PermissionError as e:
            raise ConfigError(f"output_dir: {self.output_dir} is not writable ({e.strerror}: {e.filename}); "
                              "choose a directory you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"output_dir {self.output_dir}: another run is writing there ({holder}); wait for it to finish "
                "or stop it, or choose another output_dir"
            ) from None
        except OSError as e:  # a file system without locks (some network mounts): run unlocked, say so
            os.close(fd)
            print(f"[vltune] cannot lock {self.path} ({e}); nothing stops a second run into this output_dir", flush=True)
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # before unlocking: the next holder's name must not be erased
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, as it wrote itself into the file (it writes right after locking: wait a moment)."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        if raw:
            try:
                info = json.loads(raw)
                return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
            except (ValueError, KeyError, TypeError):
                break
        time.sleep(0.05)
    return "a process that did not name itself"


def claim_output_dir(cfg: RecipeConfig, ctx: RankContext) -> Path | None:
    """Before a run writes into OUTPUT_DIR: the checkpoint it resumes (or None), its recipe checked against
    the run's; another run's checkpoints refused or, with overwrite_output_dir, removed; then recipe.json
    written. Every rank calls it; rank 0 alone prints and writes, and all ranks agree on the checkpoint."""
    out_dir, t = Path(cfg.train.output_dir), cfg.train
    recipe = cfg.to_flat_dict()
    say: Callable[[str], None] = (lambda line: print(f"[vltune] {line}", flush=True)) if ctx.is_main else (lambda line: None)
    resume_from = None
    if t.resume_from_checkpoint == "auto" and t.overwrite_output_dir:
        say("resume_from_checkpoint: auto: not resuming, because overwrite_output_dir is true")
    else:
        resume_from = resolve_resume(out_dir, t.resume_from_checkpoint, recipe, say)
    _agree(ctx, resume_from)
    earlier = complete_checkpoints(out_dir) if resume_from is None else []
    if earlier and not t.overwrite_output_dir:
        names = ", ".join(p.name for p in earlier)
        raise ConfigError(
            f"output_dir {out_dir} holds checkpoints of an earlier run ({names}) and this run starts afresh; "
            "resume it with resume_from_checkpoint: auto, set overwrite_output_dir: true to replace them, or choose another output_dir"
        )
    ctx.barrier()  # every rank has read the directory before rank 0 changes it
    if ctx.is_main:
        stale = [p for p in sorted(out_dir.glob("*checkpoint-*")) if p.is_dir() and _CHECKPOINT_DIR.fullmatch(p.name)] \
            if t.overwrite_output_dir and resume_from is None else []
        for path in stale:
            shutil.rmtree(path)
        if stale:
            say(f"overwrite_output_dir: removed {len(stale)} checkpoint directories of an earlier run from {out_dir}: "
                + ", ".join(p.name for p in stale))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    ctx.barrier()
    return resume_from


def _agree(ctx: RankContext, resume_from: Path | None) -> None:
    """Every rank resolved the same files to the same checkpoint; checked, where the context can reduce,
    because ranks resuming different steps would train on silently diverged weights."""
    all_reduce = getattr(ctx, "all_reduce", None)
    if ctx.world_size == 1 or all_reduce is None:
        return
    step = -1 if resume_from is None else int(read_trainer_state(resume_from)["step"])
    highest, negated_lowest = all_reduce([step, -step], op="max")
    if highest != -negated_lowest:
        raise ConfigError(
            f"the ranks of this run found different checkpoints to resume (steps {int(-negated_lowest)} to "
            f"{int(highest)}): is output_dir on a file system every node sees alike?"
        )
