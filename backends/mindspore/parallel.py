"""Data parallelism of the MindSpore backend: `DataParallelBackend`, the twin of the torch backend's
DDPBackend (backends/torch/parallel.py), on the msrun cluster of distributed.py.

* every rank holds the whole model and a slice of each global micro-batch (data/loader.py);
* gradients are accumulated locally over the micro-batches of a step and all-reduced once, before
  clipping, by `nn.DistributedGradReducer`, which *averages*; so each rank scales its loss by
  `world_size` on top of the loop's `1 / global trained tokens`, as DDP does, and the result is the
  gradient one process would compute on the whole global batch;
* the reduction covers every trainable parameter on every step, so a rank whose micro-batches have
  no image (its vision gradients are zeros) takes part like the others: no hang and no VisionSync.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mindspore import nn

from vltune.core.contracts import Batch

from .checkpoint import RNG_FILE, rng_state, set_rng_state
from .distributed import DistContext
from .engine import Engine


def _rank_rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else f"rng_state_rank{rank}.json"


class DataParallelBackend(Engine):
    """The single-process engine on every rank, its gradients averaged over ranks once per step.

    Every rank loads the same weights from the model directory (and LoRA draws the same seeded
    initialisation), so the replicas start equal and stay equal: they apply the same averaged
    gradients with the same AdamW state. Only rank 0 writes the model and the optimizer file.
    """

    def __init__(self, *args: Any, ctx: DistContext, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        # mean=True: the convention of DATA_PARALLEL (and of DDP), which the loss scaling below undoes.
        self.grad_reducer = nn.DistributedGradReducer(self.params, mean=True, degree=ctx.world_size)

    def forward_backward(self, batch: Batch, loss_scale: float) -> float:
        return super().forward_backward(batch, loss_scale * self.ctx.world_size)

    def reduce_sum(self, values: list[float]) -> list[float]:
        return self.ctx.all_reduce(values)

    def optimizer_step(self, lr_factor: float, max_grad_norm: float) -> float:
        if self.grads is None:
            raise RuntimeError("optimizer_step before any forward_backward")
        # One all-reduce per step over the locally accumulated gradients (DDP reduces every
        # micro-batch; the sum is the same), then clip the global gradient like one process would.
        self.grads = list(self.grad_reducer(tuple(self.grads)))
        return super().optimizer_step(lr_factor, max_grad_norm)

    def memory_stats(self) -> dict[str, float]:
        """The largest peak over ranks: the figure that decides whether a run fits."""
        stats = super().memory_stats()
        peaks = self.ctx.all_reduce(list(stats.values()), op="max")
        return {key: round(value, 3) for key, value in zip(stats, peaks)}

    def save_model(self, out_dir: Path) -> None:
        if self.ctx.is_main:  # every rank holds the same weights
            super().save_model(out_dir)

    def save_checkpoint(self, directory: Path) -> None:
        if self.ctx.is_main:
            super().save_checkpoint(directory)  # model or adapter, optimizer, rank 0's RNG streams
        else:
            state = {**rng_state(), "micro_steps": self.micro_steps}
            (Path(directory) / _rank_rng_file(self.ctx.rank)).write_text(json.dumps(state))

    def load_checkpoint(self, directory: Path) -> None:
        super().load_checkpoint(directory)  # the same weights and optimizer state on every rank
        path = Path(directory) / _rank_rng_file(self.ctx.rank)
        if self.ctx.rank and path.exists():  # a checkpoint of a run with fewer ranks has none for this one
            set_rng_state(json.loads(path.read_text()))


def build_backend(cfg: Any, info: Any, circle_rope: dict | None, mdlm: Any = None, ctx: Any = None) -> Engine:
    """The native MindSpore engine for a recipe (backends.engine's entry), in PyNative mode on the
    installed device (CPU here, Ascend in production); data parallel over the msrun workers when msrun
    started this process."""
    import mindspore as ms

    from vltune.core.config import ConfigError

    from .models import load_model

    torch_only = [key for key in ("deepspeed", "fsdp", "use_liger_kernel", "torch_compile", "pure_bf16", "bf16_master_weights") if getattr(cfg.train, key, None)]
    torch_only += [f"optim: {cfg.train.optim}"] if cfg.train.optim != "adamw_torch" else []
    if torch_only:
        raise ConfigError(f"backend mindspore: {' / '.join(torch_only)} belong to the torch engine; remove them or use backend: torch")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(cfg.train.seed)
    model = load_model(cfg.model.model_name_or_path)
    common = (model, Path(cfg.model.model_name_or_path), info, cfg.model, cfg.train, circle_rope)
    if ctx is not None and ctx.world_size > 1:
        return DataParallelBackend(*common, mdlm=mdlm, ctx=ctx)
    return Engine(*common, mdlm=mdlm)
