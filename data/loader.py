"""Seeded, epoch-based batch iteration over a dataset."""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Callable, Iterator

import numpy as np

from ..core.config import ConfigError
from ..core.contracts import IGNORE_INDEX, Batch
from .dataset import Features, SFTDataset
from .formats import SampleError
from .malloc import reuse_freed_buffers
from .workers import SampleWorkers, remove_stale_blocks


class BatchIterator:
    """Endless micro-batches: each epoch is a fresh permutation drawn from (seed, epoch).

    The order depends only on the seed and the epoch number, so a run is reproducible and a resumed
    run can rebuild its position from (epoch, index).

    Data parallelism (`world_size` > 1): every rank draws the same permutation (same seed, no
    per-rank shuffles) and a global micro-batch of `batch_size * world_size` samples; rank r takes
    the r-th slice. So the samples of a step are those a single process with a `world_size` times
    larger batch would see, and `position` (a global index) resumes under any world size.

    With `num_workers` > 0 the samples are built in worker processes (data/workers.py), planned
    `lookahead` samples ahead; the order and the skips are the same as without. A micro-batch of one
    item (a packed row) is collated there too: only the finished batch comes back.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        batch_size: int,
        collate: Callable[[list[Features]], Batch],
        seed: int,
        shuffle: bool = True,
        skip_bad_samples: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if len(dataset) < batch_size * world_size:
            raise ValueError(
                f"dataset has {len(dataset)} samples, fewer than per_device_train_batch_size {batch_size} "
                f"x {world_size} ranks"
            )
        reuse_freed_buffers()  # samples allocate MB-sized arrays: reuse them instead of re-faulting pages
        if num_workers > 0:
            remove_stale_blocks()  # what the workers of a killed run left in /dev/shm
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.shuffle = shuffle
        self.skip_bad_samples = skip_bad_samples
        self.rank = rank
        self.world_size = world_size
        self._last_good: list[Features] = []
        self.skipped: list[str] = []
        """Samples that failed while being built (e.g. a corrupt image body) and were skipped."""
        self._failing: set[int] = set()
        """Dataset indices that failed since the last sample that was built: all of them means none is usable."""
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)
        self._closed = False
        # With workers and one item per micro-batch, what _sample returns (and `features`, `_last_good`
        # hold) is the item already collated into its batch.
        self._collated_by_workers = num_workers > 0 and batch_size == 1
        finish = partial(_collate_one, collate) if self._collated_by_workers else None
        self._workers = SampleWorkers(dataset, num_workers, finish) if num_workers > 0 else None
        self.lookahead = batch_size + 2 * num_workers
        """Samples planned ahead with workers: this rank's current micro-batch and two per worker."""

    def _permutation(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.seed, epoch, len(self.dataset), self.shuffle)

    @property
    def batches_per_epoch(self) -> int:
        """Full (global) batches per epoch; a trailing partial batch is dropped (as drop_last=True)."""
        return len(self.dataset) // (self.batch_size * self.world_size)

    def state_dict(self) -> dict:
        """Where the iterator stands: enough to continue the exact same batch sequence."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        changed = [
            f"{what} {then} then, {now} now"
            for what, then, now in (("training samples (or packed rows)", state["size"], len(self.dataset)), ("seed", state["seed"], self.seed))
            if then != now
        ]
        if changed:
            raise ConfigError(
                f"cannot resume the data position: the training data changed since the checkpoint ({'; '.join(changed)}); "
                "resume with the checkpoint's data and seed, or start a fresh run (another output_dir, or overwrite_output_dir: true)"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._order = self._permutation(self.epoch)

    def _upcoming(self, n: int) -> list[tuple[tuple[int, int], int]]:
        """The next `n` ((epoch, position), dataset index) reads of this rank if no sample fails: the
        position arithmetic of __next__ / _next_shard, without building anything."""
        global_batch = self.batch_size * self.world_size
        epoch, position, order = self.epoch, self.position, self._order
        slots: list[tuple[tuple[int, int], int]] = []
        while len(slots) < n:
            if position + global_batch > len(order):
                epoch, position = epoch + 1, 0
                order = self._permutation(epoch)
            start = position + self.rank * self.batch_size
            slots += [((epoch, p), int(order[p])) for p in range(start, start + self.batch_size)]
            position += global_batch
        return slots[:n]

    def _sample(self, position: int) -> Features:
        """The sample at `position` of the current epoch's order (SampleError when it cannot be built)."""
        index = int(self._order[position])
        if self._workers is None:
            return self.dataset[index]
        return self._workers.get((self.epoch, position), index)

    def _batch(self, items: list) -> Batch:
        """The micro-batch of the items read: collated here, or already by a worker."""
        return items[0] if self._collated_by_workers else self.collate(items)

    def close(self) -> None:
        """Stop the worker processes, if any; the iterator cannot be drawn from afterwards."""
        self._closed = True
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the batch iterator is closed")
        if self._workers is not None:
            self._workers.plan(self._upcoming(self.lookahead))
        if self.world_size > 1:
            return self._next_shard()
        if self.position + self.batch_size > len(self._order):
            self._new_epoch()
        features: list[Features] = []
        while len(features) < self.batch_size:
            if self.position >= len(self._order):  # only after skips: fill the batch from the next epoch
                self._new_epoch()
            position = self.position
            self.position += 1
            try:
                features.append(self._sample(position))
                self._failing.clear()
            except SampleError as e:
                self._skip(e, position)
        return self._batch(features)

    def _skip(self, error: SampleError, position: int) -> None:
        """A sample that failed while being built: raised (skip_bad_samples off), else counted and
        skipped; a ConfigError once every sample of the data set has failed since the last good one
        (refilling from the next epoch, or standing in for a lost slice, would never end)."""
        if not self.skip_bad_samples:
            raise late_failure(error) from None
        self.skipped.append(str(error))
        rank = f" rank {self.rank}" if self.world_size > 1 else ""
        print(f"[vltune]{rank} skipped a bad sample: {error}", flush=True)
        self._failing.add(int(self._order[position]))
        if len(self._failing) == len(self.dataset):
            raise ConfigError(
                f"no usable samples: every one of the {len(self.dataset)} training samples failed while being "
                f"built ({len(self.skipped)} skips so far; the last: {error}); fix or remove them "
                "(`vltune data check RECIPE` decodes every image and lists the bad ones)"
            ) from None

    def _next_shard(self) -> Batch:
        """This rank's slice of the next global micro-batch.

        Every rank advances `position` by the whole global batch, so ranks never drift apart. A
        sample that fails while being built is skipped (and counted) without a replacement, which
        would have to come from another rank's slice: the micro-batch is one sample smaller, and the
        loop's global token count keeps the loss exact. A slice that lost every sample repeats this
        rank's last good samples with every label ignored: it still runs forward and backward (the
        collectives of the other ranks need it) but adds nothing to the loss or the gradients.
        """
        global_batch = self.batch_size * self.world_size
        if self.position + global_batch > len(self._order):
            self._new_epoch()
        start = self.position + self.rank * self.batch_size
        self.position += global_batch
        features: list[Features] = []
        for position in range(start, start + self.batch_size):
            try:
                features.append(self._sample(position))
                self._failing.clear()
            except SampleError as e:
                self._skip(e, position)
        if features:
            self._last_good = features
            return self._batch(features)
        if not self._last_good:
            raise RuntimeError(f"rank {self.rank}: every sample of its first micro-batch failed; nothing to stand in")
        batch = dict(self._batch(self._last_good))
        batch["labels"] = np.full_like(batch["labels"], IGNORE_INDEX)
        return batch


def late_failure(error: SampleError) -> SampleError:
    """A sample that failed while being built for training (the pre-flight reads image headers only, so a
    corrupt image body shows here): the same error, with the way to find them all and the way past them."""
    return SampleError(
        f"{error} (found while training: `vltune data check RECIPE` decodes every image and lists every bad sample; "
        "or set skip_bad_samples: true to skip and count them)", error.kind,
    )


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int, shuffle: bool) -> np.ndarray:
    """The sample order of an epoch, a function of (seed, epoch) only. Cached: near an epoch's end the
    workers' plan reaches into the next epoch at every micro-batch, and a permutation of a million
    samples takes tens of milliseconds. Read-only: the cache hands the same array to every caller."""
    order = np.random.default_rng([seed, epoch]).permutation(size) if shuffle else np.arange(size)
    order.flags.writeable = False
    return order


def _collate_one(collate: Callable[[list[Features]], Batch], item: Features) -> Batch:
    """A worker's collate of a one-item micro-batch (module level, so that it pickles)."""
    return collate([item])
