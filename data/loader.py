"""Seeded, epoch-based batch iteration over a dataset."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ..core.contracts import Batch
from .dataset import Features, SFTDataset


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
    ):
        if len(dataset) < batch_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than per_device_train_batch_size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.shuffle = shuffle
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

    def __next__(self) -> Batch:
        if self.position + self.batch_size > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate([self.dataset[int(i)] for i in indices])
