"""Checkpoint directories: written whole or not at all, rotated, found again on resume.

A checkpoint is `OUTPUT_DIR/checkpoint-STEP/`. It is first written to `OUTPUT_DIR/.tmp-checkpoint-STEP`
(engine files, the recipe, then `trainer_state.json` last) and renamed into place in one `os.rename`, so a
run killed at any moment leaves only complete checkpoints behind; resume ignores temporary directories.
The engine writes its own files (weights, optimizer, RNG); this module owns the directory life cycle,
which is the same for every backend, and decides which checkpoint a run may resume: one whose files are
whole (a copy, a full disk or a crashed file system can still truncate one) and whose recipe is the
run's own in every key that shapes the training trajectory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .config import ConfigError
from .safetensors_files import safetensors_problem

TRAINER_STATE = "trainer_state.json"
RECIPE_FILE = "recipe.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written (a full disk) or resumed (a truncated file, another recipe):
    the user's disk or files, not a bug, so the command line prints the one line without a traceback."""


# Recipe keys that change what a resumed run computes: the model and what is trained of it, the data and
# how it becomes batches, the seed, the optimizer and the learning-rate schedule. Every other key (max_steps,
# num_train_epochs, logging, eval and save cadence, output_dir, resume_from_checkpoint, data loader
# workers, ...) may change between a run and its resumption.
TRAJECTORY_KEYS = (
    "model_name_or_path", "model_type", "train_type", "tune_mm_llm", "tune_mm_vision", "tune_mm_mlp", "train_modules", "circle_rope",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters", "lora_modules_to_save",
    "dataset_use", "datasets", "max_pixels", "min_pixels", "video_min_pixels", "video_max_pixels", "base_interval",
    "video_min_frames", "video_max_frames", "model_max_length", "truncation_strategy", "data_flatten", "data_packing",
    "max_tokens_per_batch",
    "backend", "objective", "seed", "optim", "learning_rate", "vision_tower_lr", "mm_projector_lr", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps",
    "noise_schedule", "mdlm_eps", "mask_prompt_loss", "loss_normalization", "train_eos_tail", "mask_token",
    "freeze_vision", "freeze_merger",
)

MAY_CHANGE_ON_RESUME = (
    "make_tiny_model", "attn_implementation", "dataset_registry", "eval_dataset", "skip_bad_samples", "synthetic_vqa",
    "num_eval_samples", "dataloader_prefetch", "dataloader_num_workers", "output_dir", "max_steps", "num_train_epochs",
    "per_device_eval_batch_size", "logging_steps", "eval_steps", "eval_max_new_tokens", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "overwrite_output_dir", "metric_for_best_model", "greater_is_better",
    "early_stopping_patience", "early_stopping_threshold", "max_bad_steps", "bf16", "gradient_checkpointing",
    "gradient_checkpointing_every_n_layers",
    "use_liger_kernel", "torch_compile", "pure_bf16", "bf16_master_weights", "fp8", "num_threads", "deepspeed", "fsdp",
    "sequence_parallel_size",
    "mdlm_steps", "mdlm_block_length", "mdlm_remasking", "mdlm_temperature",
)
"""Recipe keys a resumed run may set differently: its length, cadences, evaluation, inference-time MDLM
settings, speed and precision options. Every recipe key is in exactly one of the two tuples (a test checks)."""


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


# -- which checkpoint to resume ------------------------------------------------------------------------


def resolve_resume(
    output_dir: str | Path, resume_from_checkpoint: str | None, recipe: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path | None:
    """`auto` -> the newest checkpoint of output_dir whose files are whole (broken newer ones are skipped,
    each with a `log` line saying why), or None when there is none; a path -> that checkpoint, which must be
    whole. With `recipe` (the run's flat recipe), a checkpoint trained with another recipe is refused.
    Reads only: every rank of a run calls it on the same files and gets the same answer."""
    if not resume_from_checkpoint:
        return None
    say = log or (lambda line: None)
    if resume_from_checkpoint == "auto":
        found = complete_checkpoints(output_dir)
        if not found:
            say(f"resume_from_checkpoint: auto: no checkpoint in {output_dir}; starting a fresh run")
            return None
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                check_recipe(path, recipe)
                return path
            say(f"resume_from_checkpoint: auto: skipping {path.name}: {problem}")
        raise CheckpointError(
            f"resume_from_checkpoint: auto: none of the {len(found)} checkpoints in {output_dir} can be resumed "
            "(each is listed above); remove them, or start afresh with overwrite_output_dir: true"
        )
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"resume_from_checkpoint {path}: {problem}; resume from an earlier checkpoint "
            "(resume_from_checkpoint: auto takes the newest one that is whole)"
        )
    check_recipe(path, recipe)
    return path


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed, naming the file (missing, truncated, unreadable), or None.

    Checks what can be checked without a framework: trainer_state.json and every JSON file parse, every
    safetensors file is as long as its header says, every torch file (.pt/.bin: zip archives) has its
    central directory, which sits at the very end, so any truncation loses it."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / TRAINER_STATE
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"{state_file} is missing (the checkpoint was never finished)"
    except (OSError, ValueError) as e:
        return f"{state_file} is truncated or unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or not {"step", "data"} <= state.keys():
        return f"{state_file} lacks the step and data position of a vltune checkpoint"
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path != state_file:
            problem = _file_problem(path)
            if problem is not None:
                return f"{path} {problem}"
    return None


def require_whole(path: str | Path) -> None:
    """Raise CheckpointError naming `path` when it is truncated or unreadable (see checkpoint_problem):
    what an engine calls before handing a file to a reader whose own error would not name it."""
    problem = _file_problem(Path(path))
    if problem is not None:
        raise CheckpointError(f"{path} {problem}; restore the file (or resume from an earlier checkpoint)")


def _file_problem(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            return safetensors_problem(path)
        elif path.suffix in (".pt", ".bin") and not zipfile.is_zipfile(path):
            return "is truncated or corrupt (not a whole torch archive)"
    except (OSError, ValueError) as e:
        return f"is truncated or unreadable ({type(e).__name__}: {e})"
    return None


def saved_recipe(checkpoint: Path) -> dict[str, Any] | None:
    """The recipe a checkpoint was trained with: its own recipe.json, else its run's (older checkpoints
    have none of their own; the caller reads that before a new run rewrites it), else None."""
    for path in (checkpoint / RECIPE_FILE, checkpoint.parent / RECIPE_FILE):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError as e:
                raise CheckpointError(f"{path} is truncated or unreadable ({e}); restore it or delete it") from None
    return None


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every trajectory key the two recipes both have and disagree on."""
    canonical = lambda value: json.dumps(value, sort_keys=True)  # noqa: E731  (tuples == lists, as in JSON)
    return [
        f"{key}: {saved[key]!r} -> {current[key]!r}"
        for key in TRAJECTORY_KEYS
        if key in saved and key in current and canonical(saved[key]) != canonical(current[key])
    ]


def check_recipe(checkpoint: Path, recipe: dict[str, Any] | None) -> None:
    """Refuse to resume `checkpoint` under a recipe that would train something else."""
    saved = saved_recipe(checkpoint) if recipe is not None else None
    if saved is None:
        return
    differences = recipe_differences(saved, recipe)
    if differences:
        raise CheckpointError(
            f"resume_from_checkpoint: {checkpoint} was trained with another recipe ({'; '.join(differences)}); "
            "resume with the checkpoint's values, or start a fresh run (another output_dir, or overwrite_output_dir: true)"
        )


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is truncated or unreadable ({e}); resume from an earlier checkpoint") from None


# -- writing -------------------------------------------------------------------------------------------


# A write short of space, as torch's zip writer reports it: no errno, only these words.
_SHORT_WRITE = ("unexpected pos", "file write failed")
FULL_BELOW_BYTES = 64 << 20
"""A short write counts as a full disk only when the file system has less than this left."""


def _disk_full(error: BaseException | None, directory: Path) -> bool:
    """Whether `error` (or one it came from) is a write that found the disk or the quota full: ENOSPC /
    EDQUOT, their messages, or torch's zip writer's short write on a file system that is indeed (nearly)
    full (a short write for another reason, an I/O or network error, is not called a full disk)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if any(s in text for s in _SHORT_WRITE):
            try:
                return shutil.disk_usage(directory).free < FULL_BELOW_BYTES
            except OSError:
                return False
        error = error.__cause__ or error.__context__
    return False


def _device_of(path: Path) -> str:
    """'DEVICE (mounted at MOUNT)' of the file system holding `path`, as /proc/self/mounts names it."""
    mount = Path(os.path.abspath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = None
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].encode().decode("unicode_escape") == str(mount):
                device = fields[0]  # the last mount on a point is the one in effect
    except OSError:
        pass
    return f"{device} (mounted at {mount})" if device else str(mount)


@contextmanager
def _writing(tmp: Path, name: str, owner: bool = True) -> Iterator[None]:
    """Around the files of a checkpoint's temporary directory: if they cannot all be written, the
    directory goes (a half-written checkpoint would only fill the disk further), and a full disk says so.
    Only its `owner` removes it: the other ranks of a run may still be writing into it."""
    try:
        yield
    except BaseException as e:
        full = _disk_full(e, tmp.parent)
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(
                f"no space left on {_device_of(tmp.parent)}: {name} not written (its temporary directory was "
                "removed); free space there, lower save_total_limit, or choose an output_dir on a larger disk"
            ) from e
        raise


class RankContext(Protocol):
    """What a multi-process run tells the checkpoint manager (each backend's DistContext has it)."""

    world_size: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


class OneRank:
    """The RankContext of a run in one process."""

    world_size, is_main = 1, True

    def barrier(self) -> None:
        pass


class CheckpointManager:
    """save(step, ...) and rotation under save_total_limit, never deleting the best checkpoint. With
    `recipe` (the run's flat recipe), each checkpoint carries it as recipe.json, for resume to compare.

    Under several processes (`ctx`) rank 0 owns the directory's life cycle while every rank writes its
    files: sharded engines (ZeRO-3, FSDP2) must gather on all ranks to save a model, ZeRO writes one
    optimizer shard per rank, and every rank keeps its own RNG streams. So every rank calls
    `write_engine_files` on the same temporary directory, between barriers; rank 0 alone creates it,
    writes trainer_state.json last, renames it into place and rotates old checkpoints, so a checkpoint
    appears whole or not at all. Backend-neutral: `ctx` is the torch or the MindSpore DistContext
    (one process: OneRank, whose barriers cost nothing).
    """

    def __init__(self, output_dir: str | Path, save_total_limit: int | None = None, recipe: dict[str, Any] | None = None,
                 ctx: RankContext | None = None):
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit
        self.recipe = recipe
        self.ctx = ctx or OneRank()

    def save(self, step: int, write_engine_files: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        main = self.ctx.is_main
        if main:
            with _writing(tmp, final.name):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        self.ctx.barrier()
        with _writing(tmp, final.name, owner=main):  # a failing rank ends its process; the launcher stops the others
            write_engine_files(tmp)
        self.ctx.barrier()  # every rank's files are on disk before the rename makes them a checkpoint
        if main:
            with _writing(tmp, final.name):
                if self.recipe is not None:
                    (tmp / RECIPE_FILE).write_text(json.dumps(self.recipe, indent=2) + "\n")
                self._write_trainer_state(tmp, trainer_state)  # last: its presence marks the files complete
                _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. best at the last step): replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.output_dir)
            self._rotate(keep=trainer_state.get("best_checkpoint"))
        self.ctx.barrier()
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
