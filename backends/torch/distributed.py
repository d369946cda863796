"""The process group of a data-parallel torch run, and what every engine on it shares.

torchrun (backends/torch/launch.py) starts one worker per device and sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; each worker re-runs the recipe. This module turns that
environment into a `DistContext` (rank, world size, the collectives the loop needs), writes
checkpoints from rank 0 only while letting every rank take part in gathering sharded state, and
keeps the vision tower's collectives in step across ranks (`VisionSync`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .device import accelerator
from .models import model_entry, part



def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 outside a launcher); torch-free callers use the same rule."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistContext:
    """Where this process stands in the run. A single process is rank 0 of 1 and every collective
    is the identity, so callers never branch on whether the run is distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when this module created the process group (and so destroys it in `close`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return accelerator().device(self.local_rank)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of each value over ranks, in float64 so token counts stay exact."""
        if self.world_size == 1 or not values:
            return [float(v) for v in values]
        device = self.device if dist.get_backend() in ("nccl", "hccl") else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)  # a loss may be a device scalar
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

    def close(self) -> None:
        # A one-rank group (DeepSpeed / FSDP2 without a launcher) stays for later runs in this
        # process: DeepSpeed caches groups derived from it, which a new group would orphan.
        if self.owns_group and self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(need_group: bool = False) -> DistContext:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, HCCL on NPUs, gloo on CPU).

    `need_group`: DeepSpeed and FSDP2 need a process group even on one process, so a run started
    without a launcher gets a one-rank group on a free local port.
    """
    world_size = env_world_size()
    if world_size == 1 and not need_group:
        return DistContext()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    accelerator().set_device(local_rank)  # before any device work, so each worker owns its device
    if dist.is_initialized():
        return DistContext(rank, world_size, local_rank, owns_group=False)
    if world_size == 1:  # what torchrun would have set (DeepSpeed reads LOCAL_RANK itself)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for var in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(var, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = accelerator().process_group_backend
    if backend == "nccl":  # NCCL bound to this worker's GPU (no guessing from the rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=torch.device("cuda", local_rank))
    else:  # hccl (on the NPU set above) or gloo
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, owns_group=True)


def _used_features(output: Any) -> list[torch.Tensor]:
    """The tower outputs the model's forward consumes: the merged features (`pooler_output`) and, on
    Qwen3-VL, the deepstack features; never `last_hidden_state`, which the real forward leaves unused
    (a gradient through it would run backward hooks the real path does not, and ZeRO-3 traces those)."""
    if isinstance(output, torch.Tensor):
        return [output]
    features = [output.pooler_output]
    features += list(getattr(output, "deepstack_features", None) or [])
    return [f for f in features if isinstance(f, torch.Tensor)]


class VisionSync:
    """Every rank runs the vision tower the same number of times per micro-batch.

    ZeRO-3 and FSDP2 gather the tower's parameters with collectives each time it runs, and DDP
    expects a gradient for every trainable parameter; a rank whose micro-batch has no image (or no
    video where another rank has one) would leave the others waiting forever. Before each training
    micro-batch the ranks agree on the largest number of tower calls (`prepare`); a rank with fewer
    runs the difference on a dummy 1-merged-token input, in a forward pre-hook of the language model,
    i.e. exactly where the real calls happen, so the order of collectives matches on every rank.
    The dummy output enters the input embeddings times zero: gradients of exactly zero flow back
    through the tower (DDP and ZeRO reduce them like any other), and the loss is unchanged. A family
    whose stock forward encodes before embedding the tokens (Ovis2.5; its model entry's `dummy_encode`)
    runs the dummy at the start of the inner model's forward instead, and what follows the embedding
    (`dummy_encode_late`) in the language model's pre-hook: ZeRO-3 checks the module order across ranks.
    """

    def __init__(self, model: torch.nn.Module, ctx: DistContext):
        self.ctx = ctx
        self.visual = part(model, "vision_tower")
        self.inner = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
        entry = model_entry(model.config.model_type)
        self.dummy_encode, self.dummy_encode_late = entry.dummy_encode, entry.dummy_encode_late
        self.early: list[torch.Tensor] = []
        cfg = self.visual.config
        merge = cfg.spatial_merge_size
        self.grid = torch.tensor([[1, merge, merge]], dtype=torch.long)
        channels = getattr(cfg, "in_channels", None) or cfg.num_channels  # Qwen's name, SigLIP's (Ovis2.5)
        patch_dim = channels * cfg.temporal_patch_size * cfg.patch_size**2
        self.n_patches, self.patch_dim = merge * merge, patch_dim
        self.pending = 0
        self._early_hook = None
        part(model, "llm").register_forward_pre_hook(self._run_pending, with_kwargs=True)

    @staticmethod
    def tower_calls(batch: dict) -> int:
        """How often the transformers forward calls the tower on this batch: once for the images, once for the videos."""
        return int("pixel_values" in batch) + int("pixel_values_videos" in batch)

    def prepare(self, batch: dict) -> None:
        """Agree with the other ranks (one small all-reduce) on this micro-batch's number of tower calls."""
        local = self.tower_calls(batch)
        if self.dummy_encode is not None and self._early_hook is None:
            # A forward that encodes before embedding the tokens (Ovis2.5): the dummy runs at the start of the
            # inner model's forward, after the engine's own hooks there (ZeRO-3 traces the module order,
            # which must be every rank's), so registered now, once the engine has wrapped the model.
            self._early_hook = self.inner.register_forward_pre_hook(self._run_pending_early)
        (most,) = self.ctx.all_reduce([local], op="max")
        # At least one call: under DDP the tower's trainable parameters need a gradient every step.
        self.pending = max(int(most), 1) - local

    def _dummy_pixels(self, device: torch.device) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        return torch.zeros(self.n_patches, self.patch_dim, dtype=dtype, device=device)

    def _run_pending_early(self, module: torch.nn.Module, args: tuple) -> None:
        """The family's encoding calls that precede the token embedding, kept for `_run_pending`."""
        device = next(self.visual.parameters()).device
        for _ in range(self.pending):
            self.early += self.dummy_encode(self.inner, self._dummy_pixels(device), self.grid.to(device))

    def _run_pending(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        if self.pending <= 0:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("VisionSync: the language model was called without inputs_embeds")
        pixels = self._dummy_pixels(embeds.device)
        kwargs = dict(kwargs)
        grid = self.grid.to(embeds.device)
        for _ in range(self.pending):
            if self.dummy_encode is not None:  # encoded at the forward's start; what follows the embedding now
                used = self.dummy_encode_late(self.inner, embeds.device) if self.dummy_encode_late else []
                embeds = embeds + 0.0 * sum(f.sum() for f in used).to(embeds.dtype)
                continue
            merged, *deepstack = _used_features(self.visual(pixels, grid_thw=grid))
            embeds = embeds + 0.0 * merged.sum().to(embeds.dtype)
            if deepstack and kwargs.get("deepstack_visual_embeds") is None:
                # Qwen3-VL: the deepstack features enter early decoder layers, as on a rank with images
                # (one zeroed token at position 0), so backward reaches the tower at the same layer.
                mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
                mask[0, 0] = True
                kwargs["visual_pos_masks"] = mask
                kwargs["deepstack_visual_embeds"] = [0.0 * f for f in deepstack]
            else:
                for feature in deepstack:
                    embeds = embeds + 0.0 * feature.sum().to(embeds.dtype)
        if self.early:
            embeds = embeds + 0.0 * sum(f.sum() for f in self.early).to(embeds.dtype)
            self.early = []
        self.pending = 0
        kwargs["inputs_embeds"] = embeds
        return args, kwargs
