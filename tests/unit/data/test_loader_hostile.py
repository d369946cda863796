"""The batch iterator against data that turned bad: no usable sample stops the run (instead of refilling
from the next epoch forever), a data set that changed since the checkpoint is a clear error, and the
shared-memory blocks of a killed run's workers are removed by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from vltune.core.config import ConfigError
from vltune.data.loader import BatchIterator
from vltune.data.workers import _NAMESPACE, SHARED_PREFIX, remove_stale_blocks

from numbered_samples import Numbers, collate


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1])
def test_no_usable_sample_stops_with_the_counts(workers):
    batches = BatchIterator(Numbers(5, frozenset(range(5))), 2, collate, seed=0, skip_bad_samples=True, num_workers=workers)
    try:
        with pytest.raises(ConfigError, match=r"no usable samples: every one of the 5 training samples failed while being built "
                           r"\(5 skips so far; the last: sample \d: corrupt_media\)"):
            next(batches)
    finally:
        batches.close()


@pytest.mark.timeout(60)
def test_no_usable_sample_stops_a_data_parallel_rank_too():
    """world_size > 1 stands in for a lost slice with the last good samples: once every sample fails
    (files gone after the first step), that would go on forever, every step adding nothing."""
    data = Numbers(6)
    batches = BatchIterator(data, 1, collate, seed=0, skip_bad_samples=True, rank=1, world_size=2)
    next(batches)
    data.bad = frozenset(range(6))
    with pytest.raises(ConfigError, match=r"no usable samples: every one of the 6 training samples failed while being built"):
        for _ in range(100):
            next(batches)


def test_one_usable_sample_keeps_the_run_going():
    batches = BatchIterator(Numbers(5, frozenset(range(1, 5))), 2, collate, seed=0, skip_bad_samples=True)
    assert [next(batches)["input_ids"][:, 0].tolist() for _ in range(3)] == [[0, 0]] * 3


def test_data_that_changed_since_the_checkpoint_is_a_config_error():
    saved = BatchIterator(Numbers(8), 2, collate, seed=3).state_dict()
    with pytest.raises(ConfigError, match=r"the training data changed since the checkpoint \(training samples \(or packed rows\) "
                       r"8 then, 6 now\); resume with the checkpoint's data"):
        BatchIterator(Numbers(6), 2, collate, seed=3).load_state_dict(saved)


def _block_of_a_dead_process(namespace: str = _NAMESPACE) -> str:
    """A 1 MiB block named as a worker of a trainer (of pid namespace `namespace`) that was then killed
    would have left it."""
    code = (
        "import os\nfrom multiprocessing import resource_tracker\nfrom multiprocessing.shared_memory import SharedMemory\n"
        f"block = SharedMemory(create=True, size=1 << 20, name='{SHARED_PREFIX}' + str(os.getpid()) + '_{namespace}_0badc0')\n"
        "resource_tracker.unregister(block._name, 'shared_memory')  # as after a SIGKILL: nobody cleans it\n"
        "print(block.name)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory under /dev/shm (Linux)")
def test_blocks_of_a_dead_run_are_removed_and_a_live_runs_are_kept(capsys):
    stale = _block_of_a_dead_process()
    live = SharedMemory(create=True, size=1 << 20, name=f"{SHARED_PREFIX}{os.getpid()}_{_NAMESPACE}_000001")
    try:
        assert (Path("/dev/shm") / stale).exists()
        batches = BatchIterator(Numbers(4), 2, collate, seed=0, num_workers=1)  # a new run with workers
        batches.close()
        assert not (Path("/dev/shm") / stale).exists() and (Path("/dev/shm") / live.name).exists()
        assert "removed 1 shared-memory blocks (1.0 MiB)" in capsys.readouterr().out
        assert remove_stale_blocks() == []
    finally:
        live.close()
        live.unlink()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory under /dev/shm (Linux)")
def test_a_block_of_another_pid_namespace_is_left_alone():
    """Another container sharing /dev/shm (and the hostname): its pid means nothing here, even a dead one."""
    other = f"{int(_NAMESPACE, 16) ^ 1:08x}"
    foreign = _block_of_a_dead_process(other)
    try:
        assert remove_stale_blocks() == [] and (Path("/dev/shm") / foreign).exists()
    finally:
        (Path("/dev/shm") / foreign).unlink()
