"""Seeded, epoch-based batch iteration over a dataset."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ..core.contracts import Batch
from .dataset import Features, SFTDataset
from .formats import SampleError
from .malloc import reuse_freed_buffers


class BatchIterator:
    """Endless micro-batches: each epoch is a fresh permutation drawn from (seed, epoch).

    The order depends only on the seed and the epoch number, so a run is reproducible and a resumed
    run can rebuild its position from (epoch, index).
    """

    def __init__(
        self,
        dataset: SFTDataset,
        batch_size: int,
        collate: Callable[[list[Features]], Batch],
        seed: int,
        shuffle: bool = True,
        skip_bad_samples: bool = False,
    ):
        if len(dataset) < batch_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than per_device_train_batch_size {batch_size}")
        reuse_freed_buffers()  # samples allocate MB-sized arrays: reuse them instead of re-faulting pages
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.shuffle = shuffle
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[str] = []
        """Samples that failed while being built (e.g. a corrupt image body) and were skipped."""
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch; a trailing partial batch is dropped (as drop_last=True)."""
        return len(self.dataset) // self.batch_size

    def state_dict(self) -> dict:
        """Where the iterator stands: enough to continue the exact same batch sequence."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.dataset) or state["seed"] != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint saw {state['size']} samples with seed "
                f"{state['seed']}, this run has {len(self.dataset)} with seed {self.seed}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._order = self._permutation(self.epoch)

    def __next__(self) -> Batch:
        if self.position + self.batch_size > len(self._order):
            self._new_epoch()
        features: list[Features] = []
        while len(features) < self.batch_size:
            if self.position >= len(self._order):  # only after skips: fill the batch from the next epoch
                self._new_epoch()
            index = int(self._order[self.position])
            self.position += 1
            try:
                features.append(self.dataset[index])
            except SampleError as e:
                if not self.skip_bad_samples:
                    raise
                self.skipped.append(str(e))
                print(f"[vltune] skipped a bad sample: {e}", flush=True)
        return self.collate(features)
