"""Samples built ahead of need in worker processes (`dataloader_num_workers`).

Why processes: building a sample (decode a JPEG, resize and normalise it, tokenise, lay out the
positions) is Python and numpy work of tens of milliseconds per image. On a thread it would take the
GIL away from the thread that launches the GPU's kernels, and a compiled training step is close to
bound by that thread; in separate processes it costs the trainer nothing but the copy of the result.

The batch iterator stays the only one that decides what comes next: it tells the pool which
(epoch, position) slots it expects to read (`plan`), and asks for each slot when it needs it
(`get`). A slot it asks for that was not planned (a skipped sample's refill, a resumed run) is built
on the spot; planned slots it no longer expects are cancelled. So the order, the skips and the resume
position are exactly those of the synchronous path.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Hashable

_DATASET: Any = None  # the worker's own copy of the dataset, set once per process by _start_worker


def _start_worker(dataset: Any) -> None:
    from .malloc import reuse_freed_buffers

    global _DATASET
    _DATASET = dataset
    reuse_freed_buffers()


def _build(index: int) -> Any:
    return _DATASET[index]


class SampleWorkers:
    """`dataset[index]` computed in `num_workers` spawned processes, each holding a copy of the dataset.

    Processes are spawned, not forked: the trainer that owns the pool may already hold a CUDA context
    and threads, which a forked child would inherit in an undefined state. The dataset must pickle."""

    def __init__(self, dataset: Any, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers {num_workers} must be >= 1")
        self.dataset = dataset
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None  # started at the first request, so only a run that trains has one
        self._pending: dict[Hashable, Future] = {}

    def plan(self, slots: list[tuple[Hashable, int]]) -> None:
        """Expect these (slot, dataset index) reads next, in this order: start the missing ones, cancel
        the pending ones that are no longer expected."""
        wanted = {slot for slot, _ in slots}
        for slot in [s for s in self._pending if s not in wanted]:
            self._pending.pop(slot).cancel()
        for slot, index in slots:
            if slot not in self._pending:
                self._pending[slot] = self._submit(index)

    def get(self, slot: Hashable, index: int) -> Any:
        """The sample of `slot`; a worker's exception (a SampleError of a bad sample) is raised here."""
        future = self._pending.pop(slot, None) or self._submit(index)
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"a data loader worker process died while building sample {index} (killed for memory? "
                "lower dataloader_num_workers)"
            ) from e

    def _submit(self, index: int) -> Future:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(self.dataset,),
            )
        try:
            return self._pool.submit(_build, index)
        except BrokenProcessPool as e:
            raise RuntimeError("the data loader worker processes are gone (one died earlier)") from e

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
