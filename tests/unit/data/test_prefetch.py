"""Prefetcher (dataloader_prefetch): batches made ahead on a thread reach the trainer in the source's
order; the data position, the skip count and errors are those of the batches handed out, not of the
ones made ahead."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vltune.core.mdlm import MaskedBatches
from vltune.data.formats import SampleError
from vltune.data.loader import BatchIterator
from vltune.data.prefetch import Prefetcher

from numbered_samples import Numbers, collate


def _ids(batch: dict) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def _wait_until(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the prefetch thread did not get there"
        time.sleep(0.01)


def test_same_batches_and_the_position_of_the_last_one_handed_out():
    sync = BatchIterator(Numbers(9), 2, collate, seed=5)
    data = Numbers(9)
    ahead = Prefetcher(BatchIterator(data, 2, collate, seed=5), depth=3)
    try:
        for _ in range(3):
            assert _ids(next(ahead)) == _ids(next(sync))
        _wait_until(lambda: len(data.reads) >= 12)  # three more batches made ahead than handed out
        assert ahead.state_dict() == sync.state_dict()
        resumed = Prefetcher(BatchIterator(Numbers(9), 2, collate, seed=5), depth=2)
        resumed.load_state_dict(ahead.state_dict())
        try:
            assert [_ids(next(resumed)) for _ in range(5)] == [_ids(next(sync)) for _ in range(5)]
        finally:
            resumed.close()
    finally:
        ahead.close()


def test_stage_runs_on_the_loader_thread():
    threads = []

    def stage(batch: dict) -> dict:
        threads.append(threading.current_thread().name)
        return {**batch, "staged": np.ones(1)}

    ahead = Prefetcher(BatchIterator(Numbers(4), 2, collate, seed=0), depth=1, stage=stage)
    try:
        assert "staged" in next(ahead)
        assert threads[0] == "vltune-prefetch"
    finally:
        ahead.close()


def test_a_bad_sample_is_raised_at_its_batch_after_the_good_ones():
    order = np.random.default_rng([0, 0]).permutation(8)
    ahead = Prefetcher(BatchIterator(Numbers(8, frozenset({int(order[5])})), 2, collate, seed=0), depth=4)
    try:
        assert [_ids(next(ahead)) for _ in range(2)] == [order[0:2].tolist(), order[2:4].tolist()]
        for _ in range(2):  # and again: the source is not drawn from after a failure
            with pytest.raises(SampleError, match=f"sample {int(order[5])}"):
                next(ahead)
        assert ahead.state_dict()["position"] == 4
    finally:
        ahead.close()


def test_skips_count_only_the_batches_handed_out():
    order = np.random.default_rng([0, 0]).permutation(12)
    data = Numbers(12, frozenset({int(order[1]), int(order[7])}))
    ahead = Prefetcher(BatchIterator(data, 2, collate, seed=0, skip_bad_samples=True), depth=4)
    try:
        assert _ids(next(ahead)) == [int(order[0]), int(order[2])]  # the refill
        _wait_until(lambda: int(order[7]) in data.reads)  # the second bad sample was met ahead
        assert ahead.skipped == [f"sample {int(order[1])}: corrupt_media"]
        for _ in range(3):
            next(ahead)
        assert len(ahead.skipped) == 2
    finally:
        ahead.close()


def test_masked_batches_prefetch_and_resume_with_their_draws():
    """MDLM: the masks are drawn on the thread, and the draw count resumes with the position."""

    threads = []

    class Objective:
        seed = 0

        def mask(self, batch, rng):
            threads.append(threading.current_thread().name)
            return {**batch, "noise": rng.random(1)}

    ahead = Prefetcher(MaskedBatches(BatchIterator(Numbers(8), 2, collate, seed=1), Objective()), depth=3)
    sync = MaskedBatches(BatchIterator(Numbers(8), 2, collate, seed=1), Objective())
    try:
        for _ in range(2):
            assert next(ahead)["noise"] == next(sync)["noise"]
        assert ahead.state_dict() == sync.state_dict() and ahead.state_dict()["mdlm_draws"] == 2
        assert threads[0] == "vltune-prefetch"
    finally:
        ahead.close()


def test_close_leaves_a_hung_thread_behind_with_its_source_open(capsys):
    release, closed = threading.Event(), []

    class Hung(BatchIterator):
        def __next__(self):
            release.wait()
            return super().__next__()

        def close(self):
            closed.append(True)

    ahead = Prefetcher(Hung(Numbers(4), 1, collate, seed=0), depth=1)
    ahead._thread = threading.Thread(target=ahead._fill, daemon=True)
    ahead._thread.start()
    ahead.close(timeout=0.2)
    assert "did not stop within" in capsys.readouterr().out and not closed
    release.set()
    ahead._thread.join(5)


def test_close_stops_the_thread_and_the_source():
    closed = []

    class Source(BatchIterator):
        def close(self):
            closed.append(True)

    ahead = Prefetcher(Source(Numbers(100), 1, collate, seed=0), depth=2)
    next(ahead)
    ahead.close()
    assert not ahead._thread.is_alive() and closed == [True]
    with pytest.raises(RuntimeError, match="closed"):
        next(ahead)
    with pytest.raises(RuntimeError, match="after prefetching started"):
        ahead.load_state_dict({})
    with pytest.raises(ValueError, match="depth 0"):
        Prefetcher(Source(Numbers(4), 1, collate, seed=0), depth=0)
