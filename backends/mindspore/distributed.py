"""The msrun cluster of the MindSpore backend and its collectives (the twin of backends/torch/distributed.py).

msrun (backends/mindspore/launch.py) starts one worker per device; each re-runs the recipe and
joins the cluster with `mindspore.communication.init()` (REFERENCE.md s5: on CPU this, not
`mint.distributed.init_process_group()`, works). This module turns that into a `DistContext` (rank,
world size, the collectives the loop needs); parallel.py builds the data-parallel engine on it.

Collectives on CPU (MindSpore 2.10, measured): AllReduce takes float32 and SUM only (float64, int64,
int32 and MAX are refused), `barrier` has no CPU kernel, AllGather of float32 works. So the loop's
sums (token counts, loss sums) travel as exact float32 triples through AllGather and are added in
float64 on the host, which also gives the max; a barrier is a one-element all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from .launch import inside_launcher


def split_float32(values: np.ndarray) -> np.ndarray:
    """float64 [N] -> float32 [N, 3] whose rows add up (in float64) to the values exactly.

    Each part holds the next 24 bits of the mantissa (hi, then what hi missed, then the rest), so
    53 bits fit in three (for magnitudes from ~1e-23 to 3e38, where the last part is still a normal
    float32: token counts and loss sums are). Non-finite values travel as (value, 0, 0) and stay so.
    """
    values = np.asarray(values, dtype=np.float64)
    parts = np.zeros((values.size, 3), dtype=np.float32)
    finite = np.isfinite(values)
    rest = np.where(finite, values, 0.0)
    for i in range(3):
        parts[:, i] = rest.astype(np.float32)
        rest = rest - parts[:, i].astype(np.float64)
    parts[~finite, 0] = values[~finite].astype(np.float32)
    return parts


@dataclass
class DistContext:
    """Where this process stands in the run. A single process is rank 0 of 1 and every collective is
    the identity, so callers never branch on whether the run is distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _gather(self, values: list[float]) -> np.ndarray:
        """[world_size, len(values)] float64: every rank's values, bit-exact (AllGather copies)."""
        parts = split_float32(np.asarray(values, dtype=np.float64))
        gathered = ops.AllGather()(Tensor(parts.reshape(1, -1))).asnumpy().astype(np.float64)
        return gathered.reshape(self.world_size, len(values), 3).sum(axis=2)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of each value over ranks, in float64 so token counts stay exact."""
        if self.world_size == 1 or not values:
            return [float(v) for v in values]
        per_rank = self._gather(values)
        return (per_rank.max(axis=0) if op == "max" else per_rank.sum(axis=0)).tolist()

    def barrier(self) -> None:
        """Return once every rank got here: a collective completes only when all ranks have entered it."""
        if self.world_size > 1:
            self._gather([0.0])

    def close(self) -> None:
        """Nothing to tear down: an msrun worker ends with train(), and MindSpore leaves the cluster at exit."""


def init_distributed() -> DistContext:
    """Join the msrun cluster when msrun started this process; a single process otherwise.

    In msrun's scheduler process `init()` runs the scheduler and ends the process once the workers
    are done, so nothing after it (no training, no file) ever runs there.
    """
    if not inside_launcher():
        return DistContext()
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init

    ms.set_context(mode=ms.PYNATIVE_MODE)  # before init(): the engine runs in PyNative mode
    init()
    world_size = get_group_size()
    # DATA_PARALLEL with averaged gradients: what DistributedGradReducer reads when not told otherwise.
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world_size)
    return DistContext(rank=get_rank(), world_size=world_size, local_rank=get_local_rank())
