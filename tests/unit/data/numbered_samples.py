"""A dataset whose sample i is the number i, for the batch iterator's tests (sharding, prefetching,
worker processes). A module of its own so that spawned worker processes can import it."""

from __future__ import annotations

import numpy as np

from vltune.data.formats import SampleError


class Numbers:
    """Sample i is the number i; samples in `bad` fail as a corrupt image would. `reads` lists the
    indices read in this process, in order."""

    def __init__(self, n: int, bad: frozenset[int] = frozenset()):
        self.n, self.bad = n, bad
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads.append(i)
        if i in self.bad:
            raise SampleError(f"sample {i}: corrupt_media", kind="corrupt_media")
        return i


def collate(features: list[int]) -> dict:
    ids = np.array(features, dtype=np.int64)[:, None]
    return {"input_ids": ids, "labels": ids.copy()}
