"""BatchIterator with worker processes (dataloader_num_workers): the very batches, skips and resume
positions of the synchronous path, and a clear error when a worker dies."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vltune.data.formats import SampleError
from vltune.data.loader import BatchIterator
from vltune.data.workers import SHARED_PREFIX

import numbered_samples


class Numbers(numbered_samples.Numbers):
    """Sample i is (i, the pid of the process that built it); `fatal` ones kill that process."""

    def __init__(self, n: int, bad: frozenset[int] = frozenset(), fatal: frozenset[int] = frozenset()):
        super().__init__(n, bad)
        self.fatal = fatal

    def __getitem__(self, i: int) -> tuple[int, int]:
        if i in self.fatal:
            os._exit(3)
        return super().__getitem__(i), os.getpid()


class Images(numbered_samples.Numbers):
    """Sample i: a dataclass with a 2 MiB array of value i (it travels through shared memory) and a small one."""

    def __getitem__(self, i: int):
        i = super().__getitem__(i)
        return Patches(np.full((512, 1024), i, np.float32), np.array([i]))


@dataclass
class Patches:
    pixels: np.ndarray
    ids: np.ndarray


def _shared_blocks() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{SHARED_PREFIX}*")}


def collate(features: list[tuple[int, int]]) -> dict:
    ids = np.array([i for i, _ in features], dtype=np.int64)[:, None]
    return {"input_ids": ids, "labels": ids.copy(), "pids": np.array([p for _, p in features])}


def collate_with_pid(features: list[tuple[int, int]]) -> dict:
    return {**collate(features), "collated_by": np.array([os.getpid()])}


def _draw(iterator: BatchIterator, n: int) -> list[list[int]]:
    return [next(iterator)["input_ids"][:, 0].tolist() for _ in range(n)]


def test_workers_give_the_synchronous_batches_skips_and_positions():
    """Across two epoch ends (7 samples, batches of 3: one sample dropped per epoch) and two skipped
    samples, whose refills shift every later batch off the plan the workers were given."""
    bad = frozenset({2, 5})
    sync = BatchIterator(Numbers(7, bad), 3, collate, seed=3, skip_bad_samples=True)
    pooled = BatchIterator(Numbers(7, bad), 3, collate, seed=3, skip_bad_samples=True, num_workers=2)
    try:
        for _ in range(7):
            expected, got = next(sync), next(pooled)
            assert got["input_ids"].tolist() == expected["input_ids"].tolist()
            assert pooled.state_dict() == sync.state_dict()
            assert os.getpid() not in got["pids"]  # built in the workers
        assert pooled.skipped == sync.skipped and len(sync.skipped) >= 2
        assert "sample 2: corrupt_media" in sync.skipped
    finally:
        pooled.close()


def test_workers_under_data_parallelism_and_resume():
    ranks = [BatchIterator(Numbers(10), 2, collate, seed=1, rank=r, world_size=2, num_workers=1) for r in range(2)]
    single = BatchIterator(Numbers(10), 4, collate, seed=1)
    try:
        for _ in range(4):  # past the epoch end (10 samples, global batches of 4)
            assert sum(_draw(ranks[0], 1) + _draw(ranks[1], 1), []) == _draw(single, 1)[0]
        resumed = BatchIterator(Numbers(10), 4, collate, seed=1, num_workers=2)
        resumed.load_state_dict(ranks[0].state_dict())
        try:
            assert _draw(resumed, 3) == _draw(single, 3)
        finally:
            resumed.close()
    finally:
        for it in ranks:
            it.close()


def test_a_bad_sample_without_skipping_raises_its_own_error():
    order = np.random.default_rng([0, 0]).permutation(6)
    pooled = BatchIterator(Numbers(6, frozenset({int(order[4])})), 2, collate, seed=0, num_workers=2)
    try:
        _draw(pooled, 2)
        with pytest.raises(SampleError, match=f"sample {int(order[4])}: corrupt_media") as e:
            next(pooled)
        assert e.value.kind == "corrupt_media"
    finally:
        pooled.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(pooled)


def test_a_dead_worker_is_reported():
    order = np.random.default_rng([0, 0]).permutation(6)
    pooled = BatchIterator(Numbers(6, fatal=frozenset({int(order[0])})), 2, collate, seed=0, num_workers=1)
    try:
        with pytest.raises(RuntimeError, match="data loader worker process died while building sample"):
            next(pooled)
    finally:
        pooled.close()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_each_epoch_reads_its_own_permutation(num_workers):
    iterator = BatchIterator(Numbers(5), 2, collate, seed=4, num_workers=num_workers)
    try:
        epochs = [np.random.default_rng([4, e]).permutation(5).tolist() for e in range(3)]
        assert _draw(iterator, 6) == [epochs[e][p : p + 2] for e in range(3) for p in (0, 2)]  # the 5th is dropped
    finally:
        iterator.close()


def test_a_real_dataset_pickles_for_the_workers(tiny_qwen2_5_vl, vqa_data):
    """Spawned workers get the dataset by pickle: the chat template's helpers are lambdas, so the
    tokenizer travels as its model directory and is rebuilt there, giving the very same features."""
    import pickle

    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    dataset = SFTDataset(load_samples(vqa_data["eval_file"])[:2], tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    copy = pickle.loads(pickle.dumps(dataset))
    for i in range(2):
        a, b = dataset[i], copy[i]
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.pixel_values, b.pixel_values)


def test_large_arrays_come_back_through_shared_memory_and_no_block_is_left(monkeypatch):
    """A skip late in the epoch shifts the next batches onto the next epoch's order: samples planned for
    the old layout are dropped, some while a worker builds them. Their blocks are freed too, as are those
    of the samples still planned at close."""
    from vltune.data.workers import SampleWorkers

    drops = []
    drop = SampleWorkers._drop
    monkeypatch.setattr(SampleWorkers, "_drop", staticmethod(lambda future: drops.append(future) or drop(future)))
    bad = frozenset({int(np.random.default_rng([2, 0]).permutation(12)[9])})
    before = _shared_blocks()
    pooled = BatchIterator(Images(12, bad), 2, lambda fs: fs, seed=2, skip_bad_samples=True, num_workers=2)
    sync = BatchIterator(Images(12, bad), 2, lambda fs: fs, seed=2, skip_bad_samples=True)
    try:
        for _ in range(8):
            for got, expected in zip(next(pooled), next(sync)):
                assert got.pixels.flags.owndata and np.array_equal(got.pixels, expected.pixels)
                assert np.array_equal(got.ids, expected.ids)
            assert pooled._workers._pending  # the following samples are being built already
        assert drops  # the skip abandoned planned samples during the run
    finally:
        pooled.close()
    assert _shared_blocks() <= before


def test_arrays_are_pickled_when_shared_memory_is_short(monkeypatch):
    """A write into a full /dev/shm (Docker's is 64 MB) would kill the worker: below the reserve the
    array travels by pickle; above it, through a block that taking it removes."""
    import vltune.data.workers as workers

    array = np.arange(1 << 19, dtype=np.float32)  # 2 MiB
    monkeypatch.setattr(workers, "_shared_memory_free", lambda: workers.SHARED_RESERVE_BYTES)
    assert workers._share(array) is array
    monkeypatch.setattr(workers, "_shared_memory_free", lambda: 1 << 40)
    shared = workers._share(array)
    assert isinstance(shared, workers._Shared) and shared.name.lstrip("/") in {p.lstrip("/") for p in _shared_blocks()}
    assert np.array_equal(workers._take(shared), array) and shared.name.lstrip("/") not in _shared_blocks()


def test_one_item_micro_batches_are_collated_in_the_workers():
    """Packed rows (one item per micro-batch): the worker collates, only the finished batch comes back."""
    order = np.random.default_rng([5, 0]).permutation(9)
    bad = frozenset({int(order[2])})
    pooled = BatchIterator(Numbers(9, bad), 1, collate_with_pid, seed=5, skip_bad_samples=True, num_workers=2)
    sync = BatchIterator(Numbers(9, bad), 1, collate_with_pid, seed=5, skip_bad_samples=True)
    try:
        for _ in range(12):
            got, expected = next(pooled), next(sync)
            assert got["input_ids"].tolist() == expected["input_ids"].tolist()
            assert got["collated_by"][0] == got["pids"][0] != os.getpid()
        assert pooled.skipped == sync.skipped and pooled.state_dict() == sync.state_dict()
    finally:
        pooled.close()
    ranks = [BatchIterator(Numbers(8, frozenset({int(np.random.default_rng([0, 0]).permutation(8)[2])})), 1, collate_with_pid,
                           seed=0, rank=r, world_size=2, skip_bad_samples=True, num_workers=1) for r in range(2)]
    try:
        first = next(ranks[0])
        stand_in = next(ranks[0])  # its sample failed: the last good batch, every label ignored
        assert stand_in["input_ids"].tolist() == first["input_ids"].tolist() and (stand_in["labels"] == -100).all()
        assert (first["labels"] != -100).all()  # the batch handed out before is not changed
    finally:
        for it in ranks:
            it.close()
