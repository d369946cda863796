"""BatchIterator under data parallelism: same seeded order on every rank, disjoint slices of one
global batch, exactly the samples a single process with a world_size times larger batch sees."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.data.loader import BatchIterator

from numbered_samples import Numbers, collate


def test_ranks_split_the_single_process_batches():
    single = BatchIterator(Numbers(20), 4, collate, seed=7)
    ranks = [BatchIterator(Numbers(20), 2, collate, seed=7, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == single.batches_per_epoch == 5
    for _ in range(12):  # past an epoch boundary: every rank starts the new permutation together
        expected = next(single)["input_ids"][:, 0].tolist()
        got = [next(it)["input_ids"][:, 0].tolist() for it in ranks]
        assert got[0] + got[1] == expected
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_resume_under_another_world_size():
    """`position` is global, so a checkpoint of a 2-rank run resumes in one process at the same sample."""
    ranks = [BatchIterator(Numbers(20), 2, collate, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for it in ranks:
            next(it)
    single = BatchIterator(Numbers(20), 4, collate, seed=1)
    single.load_state_dict(ranks[0].state_dict())
    following = [next(it)["input_ids"][:, 0].tolist() for it in ranks]
    assert next(single)["input_ids"][:, 0].tolist() == following[0] + following[1]


def test_bad_sample_shrinks_only_its_rank():
    order = np.random.default_rng([0, 0]).permutation(8)
    bad = frozenset({int(order[0])})  # rank 0's only sample of the first global batch
    ranks = [BatchIterator(Numbers(8, bad), 1, collate, seed=0, rank=r, world_size=2, skip_bad_samples=True) for r in range(2)]
    assert next(ranks[1])["input_ids"][:, 0].tolist() == [int(order[1])]
    with pytest.raises(RuntimeError, match="nothing to stand in"):
        next(ranks[0])  # nothing good seen yet on this rank
    ranks = [BatchIterator(Numbers(8, frozenset({int(order[2])})), 1, collate, seed=0, rank=r, world_size=2, skip_bad_samples=True)
             for r in range(2)]
    first = next(ranks[0])
    stand_in = next(ranks[0])  # its sample failed: the last good one, contributing nothing
    assert stand_in["input_ids"].tolist() == first["input_ids"].tolist()
    assert (stand_in["labels"] == -100).all() and len(ranks[0].skipped) == 1
    assert ranks[0].state_dict()["position"] == 4  # two global batches of 2, as on every other rank


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 2"):
        BatchIterator(Numbers(8), 1, collate, seed=0, rank=2, world_size=2)
