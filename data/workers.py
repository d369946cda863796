"""Samples built ahead of need in worker processes (`dataloader_num_workers`).

Why processes: building a sample (decode a JPEG, resize and normalise it, tokenise, lay out the
positions) is Python and numpy work of tens of milliseconds per image. On a thread it would take the
GIL away from the thread that launches the GPU's kernels, and a compiled training step is close to
bound by that thread; in separate processes it costs the trainer nothing but the copy of the result.

Why shared memory for the arrays: a result that comes back through the pool's pipe is unpickled by a
thread of the trainer's process, and unpickling copies each array while holding the GIL (measured on a
2-core machine: a thread unpickling 48 MB arrays slowed a pure-Python thread 7.5x; copying the same
arrays with numpy did not slow it). So each array of 1 MiB or more (the patches) leaves the worker in a
shared-memory block, and the trainer's side copies it out with numpy, which lets go of the GIL.

The batch iterator stays the only one that decides what comes next: it tells the pool which
(epoch, position) slots it expects to read (`plan`), and asks for each slot when it needs it
(`get`). A slot it asks for that was not planned (a skipped sample's refill, a resumed run) is built
on the spot; planned slots it no longer expects are cancelled. So the order, the skips and the resume
position are exactly those of the synchronous path.

A trainer killed with SIGKILL gets no chance to stop its workers. So each worker watches its parent and
exits when it is gone (`_exit_with_owner`). Python's resource tracker then frees the blocks the workers
made, but not when it dies too (a whole process group or container killed: scancel, an OOM kill, docker
stop). So each block is named after the trainer that owns it (`vltune_<pid>_<pid namespace>_<random>`),
and a later run removes the blocks of owners that are dead (`remove_stale_blocks`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import secrets
import socket
import threading
import time
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable, Hashable

import numpy as np

_DATASET: Any = None  # the worker's own copy of the dataset, set once per process by _start_worker
_FINISH: Callable[[Any], Any] | None = None  # and what it applies to each item (the collate of a one-item batch)
_OWNER: int | None = None  # the pid of the trainer this worker builds for (None: this process is the trainer)
SHARED_MIN_BYTES = 1 << 20
"""Arrays at least this large travel through shared memory; smaller ones are pickled."""
SHARED_RESERVE_BYTES = 256 << 20
"""Room left free in /dev/shm: a block is written only when this much more is free, else the array is
pickled (slower, but a write into a full /dev/shm kills the worker with SIGBUS; Docker gives 64 MB)."""
SHARED_PREFIX = "vltune_"
"""Names of the blocks: vltune_<owner pid>_<pid namespace>_<random>, at most 31 characters with the
leading slash (macOS's limit). A pid means something only in its pid namespace: two containers sharing
/dev/shm (and even their hostname) each have a process 1234, so a run judges only the blocks of its own
namespace, and leaves those of any other alone."""


def _pid_namespace() -> str:
    """8 hex digits naming this process's pid namespace: the inode of /proc/self/ns/pid (unique per
    namespace on a kernel), else, without /proc (not Linux), a hash of the hostname."""
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino & 0xFFFFFFFF:08x}"
    except OSError:
        return f"{zlib.crc32(socket.gethostname().encode()):08x}"


_NAMESPACE = _pid_namespace()
_BLOCK = re.compile(rf"^{SHARED_PREFIX}(\d+)_([0-9a-f]{{8}})_[0-9a-f]+$")


@dataclasses.dataclass(frozen=True)
class _Shared:
    """An array left in a shared-memory block by a worker: what the trainer's side needs to take it."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _map_arrays(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`value` with `fn` applied to every array or _Shared inside it: a sample (a dataclass of arrays), a
    pack (a list of samples), a batch (a dict of arrays) or anything else (returned as it is). Dataclasses
    are rebuilt with `dataclasses.replace`, so every field must be an `__init__` argument."""
    if isinstance(value, (np.ndarray, _Shared)):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_arrays(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_arrays(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_arrays(getattr(value, f.name), fn) for f in dataclasses.fields(value)})
    return value


def _share(array: Any) -> Any:
    """Worker side: a large array into a new shared-memory block (the trainer's side unlinks it)."""
    if not isinstance(array, np.ndarray) or array.nbytes < SHARED_MIN_BYTES or array.dtype.hasobject:
        return array
    if _shared_memory_free() < array.nbytes + SHARED_RESERVE_BYTES:
        return array
    owner = os.getpid() if _OWNER is None else _OWNER
    block = SharedMemory(create=True, size=array.nbytes, name=f"{SHARED_PREFIX}{owner}_{_NAMESPACE}_{secrets.token_hex(3)}")
    np.copyto(np.ndarray(array.shape, array.dtype, buffer=block.buf), array)
    shared = _Shared(block.name, array.shape, array.dtype.str)
    block.close()
    return shared


def _shared_memory_free() -> int:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (not Linux): let SharedMemory find its own place
        return 1 << 62
    return stat.f_bavail * stat.f_frsize


def _take(shared: Any) -> Any:
    """Trainer side: the array of a shared-memory block, copied out (without the GIL), the block removed."""
    if not isinstance(shared, _Shared):
        return shared
    block = SharedMemory(name=shared.name)
    try:
        array = np.empty(shared.shape, np.dtype(shared.dtype))
        np.copyto(array, np.ndarray(shared.shape, array.dtype, buffer=block.buf))
    finally:
        block.close()
        block.unlink()
    return array


def remove_stale_blocks(root: str = "/dev/shm") -> list[str]:
    """Remove the shared-memory blocks that workers of a dead trainer of this pid namespace left (a run
    killed with SIGKILL never takes them); the names of those removed. A block of a live trainer, or of
    another namespace (whose pids we cannot judge), is left alone."""
    try:
        names = os.listdir(root)
    except OSError:  # no /dev/shm (not Linux)
        return []
    removed, size = [], 0
    for name in names:
        match = _BLOCK.match(name)
        if match is None or match.group(2) != _NAMESPACE or _alive(int(match.group(1))):
            continue
        path = os.path.join(root, name)
        try:
            size += os.stat(path).st_size
            os.unlink(path)
        except OSError:  # another rank of this run removed it first
            continue
        removed.append(name)
    if removed:
        print(f"[vltune] removed {len(removed)} shared-memory blocks ({size / 2**20:.1f} MiB) in {root} left by the "
              "data loader workers of a run that was killed", flush=True)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # no /proc (not Linux): kill(pid, 0) said it runs
    except (OSError, IndexError):
        return True


def _exit_with_owner(owner: int, period: float = 0.5) -> None:
    """A worker's thread: exit as soon as the trainer that started it is gone (then this process has a
    new parent). Polling, because prctl's PR_SET_PDEATHSIG fires when the *thread* that spawned the
    worker ends, and the pool may be started from the prefetch thread, which ends before the pool does."""
    while os.getppid() == owner:
        time.sleep(period)
    os._exit(1)


def _start_worker(dataset: Any, finish: Callable[[Any], Any] | None, owner: int) -> None:
    from .malloc import reuse_freed_buffers

    global _DATASET, _FINISH, _OWNER
    _DATASET, _FINISH, _OWNER = dataset, finish, owner
    threading.Thread(target=_exit_with_owner, args=(owner,), name="vltune-exit-with-owner", daemon=True).start()
    reuse_freed_buffers()


def _build(index: int) -> Any:
    item = _DATASET[index]
    return _map_arrays(item if _FINISH is None else _FINISH(item), _share)


class SampleWorkers:
    """`dataset[index]` computed in `num_workers` spawned processes, each holding a copy of the dataset;
    with `finish`, `finish(dataset[index])` (the batch iterator's collate of a one-sample batch).

    Processes are spawned, not forked: the trainer that owns the pool may already hold a CUDA context
    and threads, which a forked child would inherit in an undefined state. The dataset must pickle."""

    def __init__(self, dataset: Any, num_workers: int, finish: Callable[[Any], Any] | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers {num_workers} must be >= 1")
        self.dataset = dataset
        self.finish = finish
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None  # started at the first request, so only a run that trains has one
        self._pending: dict[Hashable, Future] = {}

    def plan(self, slots: list[tuple[Hashable, int]]) -> None:
        """Expect these (slot, dataset index) reads next, in this order: start the missing ones, drop
        the pending ones that are no longer expected."""
        wanted = {slot for slot, _ in slots}
        for slot in [s for s in self._pending if s not in wanted]:
            self._drop(self._pending.pop(slot))
        for slot, index in slots:
            if slot not in self._pending:
                self._pending[slot] = self._submit(index)

    def get(self, slot: Hashable, index: int) -> Any:
        """The sample of `slot`; a worker's exception (a SampleError of a bad sample) is raised here."""
        future = self._pending.pop(slot, None) or self._submit(index)
        try:
            return _map_arrays(future.result(), _take)
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"a data loader worker process died while building sample {index}: killed for memory (lower "
                "dataloader_num_workers), or a crash in image decoding; dataloader_num_workers: 0 builds the "
                "samples in this process, where the error shows"
            ) from e

    def _submit(self, index: int) -> Future:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(self.dataset, self.finish, os.getpid()),
            )
        try:
            return self._pool.submit(_build, index)
        except BrokenProcessPool as e:
            raise RuntimeError("the data loader worker processes are gone (one died earlier)") from e

    @staticmethod
    def _drop(future: Future) -> None:
        """Cancel a sample no longer wanted; one already being built is freed (its shared blocks) when done."""
        if not future.cancel():
            future.add_done_callback(lambda done: done.exception() or _map_arrays(done.result(), _take))

    def close(self) -> None:
        for future in self._pending.values():
            self._drop(future)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
