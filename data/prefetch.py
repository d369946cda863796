"""Micro-batches made ahead of the training step on a background thread (`dataloader_prefetch`).

Why: the training thread would otherwise build each micro-batch between two GPU steps: gather the
samples, collate (or pack) them, mask them (MDLM), and copy them into page-locked memory for an
asynchronous copy to the GPU. Meanwhile the GPU, whose queue the previous step's loss read emptied,
waits. Here a thread does all of that while the training thread launches the current step; the
training thread only takes finished batches from a queue. The heavy per-sample work can go further,
to worker processes (data/workers.py), so that it does not compete for the GIL either.

Exactness: the thread draws from the same source in the same order. `state_dict` is the source's
state as of the last batch handed to the trainer, not of the last one built, so a checkpoint resumes
at the first batch the trainer never saw. An exception while building (a bad sample without
skip_bad_samples) is raised to the trainer at the batch where it happened, after the batches before it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from ..core.contracts import Batch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Wraps a batch source (`__next__`, `state_dict`, `load_state_dict`, `skipped`, `close`: a
    BatchIterator or MaskedBatches): up to `depth` batches are
    made ahead on one thread; each goes through `stage` there (the engine's host-side preparation,
    e.g. copying into pinned memory) before the trainer gets it.

    The thread starts at the first `__next__`, so a resumed run loads its position first."""

    def __init__(self, source: Any, depth: int, stage: Callable[[Batch], Batch] | None = None):
        if depth < 1:
            raise ValueError(f"depth {depth} must be >= 1 (0 means: do not prefetch)")
        self.source = source
        self.depth = depth
        self.stage = stage
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._state = source.state_dict()
        self._n_skipped = len(source.skipped)

    @property
    def batches_per_epoch(self) -> int:
        return self.source.batches_per_epoch

    @property
    def skipped(self) -> list[str]:
        """The source's skipped samples, up to the last batch handed out (not those of batches made ahead)."""
        return self.source.skipped[: self._n_skipped]

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("cannot load a data position after prefetching started")
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self._failure is not None:
            raise self._failure
        if self._stop.is_set():
            raise RuntimeError("the prefetcher is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="vltune-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._failure = item.error
            raise item.error
        batch, self._state, self._n_skipped = item
        return batch

    def _fill(self) -> None:
        """The thread: make batches until stopped or until the source fails (that failure is queued last)."""
        while not self._stop.is_set():
            try:
                batch = next(self.source)
                item: Any = (batch if self.stage is None else self.stage(batch), self.source.state_dict(), len(self.source.skipped))
            except BaseException as e:  # handed to the trainer, which raises it
                item = _Failure(e)
            if not self._put(item) or isinstance(item, _Failure):
                return

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (a batch being made is finished first) and close the source. A thread still
        busy after `timeout` seconds (a hung read) is left behind, a daemon, with its source open."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                print(f"[vltune] the data loader thread did not stop within {timeout:.0f} s; leaving it", flush=True)
                return
        self.source.close()
