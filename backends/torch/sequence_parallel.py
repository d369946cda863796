"""Ulysses sequence parallelism on the stock transformers models: hooks, not a model rewrite.

core/sequence_parallel.py says who holds what; this module makes a forward and backward run that way on
the ranks of one sequence group (N ranks holding the same packed row):

* The vision tower runs once per row: the inner model's `get_image_features` / `get_video_features`
  encode this rank's share of the images (`media_split`) and all-gather the features, so every rank
  places every image's features into the whole row's embeddings, as the stock forward does.
* A forward pre-hook on the language model cuts its inputs to this rank's shard of tokens (embeddings,
  positions; Qwen3-VL's deepstack features of the shard's visual tokens).
* Attention (backends/torch/attention.py) and the Gated DeltaNet (linear_attention.py) call
  `seq_to_heads` before their sequence kernels and `heads_to_seq` after them: an all-to-all turns
  [tokens / N, all heads] into [all tokens, heads / N] and back, and the kernels run on whole samples
  with the row's full `cu_seqlens`. Everything else in a decoder layer is per token.
* An MoE model's router logits are all-gathered at the language model's output, so the load-balancing
  loss is the whole row's (each rank then adds 1 / N of it).

Each collective is an autograd Function whose backward is the matching collective, so gradients reach
the rank that computed each activation; the data-parallel wrappers (DDP, FSDP2, ZeRO) still average
over every rank, which is why each rank's shard loss is scaled by the world size like any other.
The hooks act only inside `SequenceParallel.sharding()`, which spans a training micro-step's forward and
backward (non-reentrant checkpointing replays layer forwards during backward); evaluation and
generation run the whole row on every rank.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from vltune.core.sequence_parallel import SequenceLayout, media_split, shard_bounds

from .models import part

_active: "SequenceParallel | None" = None


def active() -> "SequenceParallel | None":
    """The sequence group of the micro-step being run, or None outside one (then nothing is sharded)."""
    return _active


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # of the contiguous copy: empty_like keeps a transposed input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """x [N, ...]: chunk i goes to rank i, chunk j of the result came from rank j. Its own inverse, so the
    backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """Each rank's rows [n_r, ...] -> all ranks' rows in rank order [sum n_r, ...]. Every rank's result
    feeds its own loss, so the gradient of a rank's rows is the sum over ranks (all-reduce), sliced."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        longest = max(counts)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None, None


class SequenceParallel:
    """This rank's sequence group and data-parallel group, and the hooks that shard a model's forward."""

    def __init__(self, rank: int, world_size: int, size: int):
        self.layout = SequenceLayout.of(rank, world_size, size)
        self.size, self.rank = size, self.layout.rank
        # Every rank creates every group, in one order (torch.distributed requires it).
        self.group = self.dp_group = None
        for ranks in self.layout.group_ranks():
            group = dist.new_group(ranks)
            if rank in ranks:
                self.group = group
        for ranks in self.layout.data_parallel_ranks():
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = group
        self.bounds: tuple[int, int] | None = None
        self._encoding = False

    # -- the micro-step ---------------------------------------------------------------------------------
    @contextmanager
    def sharding(self, length: int, real_length: int) -> Iterator[None]:
        """Within this block the model runs this rank's shard of a row of `length` tokens (padded to N from
        `real_length`)."""
        global _active
        self.bounds = shard_bounds(length, self.size, self.rank)
        self.real_length = real_length
        _active = self
        try:
            yield
        finally:
            _active, self.bounds = None, None

    def reduce_dp(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) over the data-parallel group: within a sequence group every rank holds the same row,
        so its counts are the row's, and summing over all ranks would count each row N times."""
        if not values:
            return []
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.dp_group)
        return tensor.tolist()

    def row_total(self, value: torch.Tensor) -> torch.Tensor:
        """A detached per-shard scalar summed over the sequence group (the row's loss, for logging)."""
        total = value.detach().to(self._collective_device(), torch.float64).reshape(1).clone()
        dist.all_reduce(total, group=self.group)
        return total[0]

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- collectives the layers call ------------------------------------------------------------------
    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T/N, H, ...] (this rank's tokens, every head) -> [T, H/N, ...] (every token, this rank's heads)."""
        tokens, heads = x.shape[:2]
        chunks = x.reshape(tokens, self.size, heads // self.size, *x.shape[2:]).transpose(0, 1)
        got = _AllToAll.apply(chunks, self.group)  # [N source ranks, T/N, H/N, ...]
        return got.reshape(self.size * tokens, heads // self.size, *x.shape[2:])

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H/N, ...] -> [T/N, H, ...], the inverse of seq_to_heads."""
        tokens, heads = x.shape[0] // self.size, x.shape[1]
        chunks = x.reshape(self.size, tokens, heads, *x.shape[2:])  # chunk i: rank i's tokens
        got = _AllToAll.apply(chunks, self.group)  # [N head groups, T/N, H/N, ...]
        return got.transpose(0, 1).reshape(tokens, self.size * heads, *x.shape[2:])

    def gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return _GatherRows.apply(x, counts, self.rank, self.group)

    def shard(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        start, stop = self.bounds
        return x.narrow(dim, start, stop - start)

    # -- hooks ----------------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module) -> None:
        """Shard `model`'s forward while `sharding()` is open: encoders split by image, the language model
        fed this rank's shard, MoE router logits gathered. Idempotent; call it after VisionSync's hooks."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "_vltune_sequence_parallel", None) is self:
            return
        inner = base.model
        self._tower = part(base, "vision_tower")
        for name in ("get_image_features", "get_video_features"):
            if hasattr(inner, name):
                setattr(inner, name, self._split_encoder(getattr(inner, name)))
        llm = part(base, "llm")
        llm.register_forward_pre_hook(self._shard_language_model_inputs, with_kwargs=True)
        llm.register_forward_hook(self._gather_router_logits)
        base._vltune_sequence_parallel = self

    def _split_encoder(self, encode):
        """`encode` (a bound get_*_features) run on this rank's images only, the per-image features of
        all ranks gathered: the tower's work is split over the group instead of repeated on each rank."""

        pixels_name, grid_name = list(inspect.signature(encode).parameters)[:2]  # callers may name them

        def split_encode(*args: Any, **kwargs: Any):
            if active() is not self or self._encoding:  # whole-row runs; a family's video path calling its image path
                return encode(*args, **kwargs)
            given = dict(zip((pixels_name, grid_name), args[:2]))
            given.update({name: kwargs.pop(name) for name in (pixels_name, grid_name) if name in kwargs})
            self._encoding = True
            try:
                return self._encode_share(encode, given[pixels_name], given[grid_name], *args[2:], **kwargs)
            finally:
                self._encoding = False

        return split_encode

    def _encode_share(self, encode, pixel_values, grid_thw, *args, **kwargs):
        grid = grid_thw.detach().cpu().numpy()
        patches = grid.prod(axis=1)
        merged = patches // self._tower.config.spatial_merge_size**2  # features per image (the stock split)
        shares = media_split(patches, self.size)
        first, last = shares[self.rank]
        offsets = np.concatenate([[0], np.cumsum(patches)])
        dummy = last == first
        if not dummy:
            out = encode(pixel_values[offsets[first] : offsets[last]], grid_thw[first:last], *args, **kwargs)
        else:  # no image here: a 1-merged-token dummy keeps the tower's collectives and gradients in step
            merge = self._tower.config.spatial_merge_size
            out = encode(pixel_values[: merge * merge] * 0, grid_thw.new_tensor([[1, merge, merge]]), *args, **kwargs)
        counts = [int(merged[a:b].sum()) for a, b in shares]
        sizes = merged.tolist()

        def gathered(per_image: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            if not dummy:
                return torch.split(self.gather_rows(torch.cat(per_image), counts), sizes)
            rows = self.gather_rows(per_image[0][:0], counts)
            # zero times the dummy's features: its gradients (zeros) still flow back through the tower
            return torch.split(rows + 0.0 * sum(f.sum() for f in per_image), sizes)

        out.pooler_output = gathered(out.pooler_output)
        if getattr(out, "deepstack_features", None):
            out.deepstack_features = [gathered(level) for level in out.deepstack_features]
        out.last_hidden_state = None  # per-patch states of this rank's images only; the forward does not read them
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = None
        return out

    def _shard_language_model_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        if active() is not self:
            return None
        kwargs = dict(kwargs)
        embeds = kwargs["inputs_embeds"]
        start, stop = self.bounds
        if embeds.shape[1] != self.size * (stop - start):
            raise RuntimeError(f"sequence parallelism: the language model got {embeds.shape[1]} tokens, "
                               f"expected the padded row of {self.size * (stop - start)}")
        kwargs["inputs_embeds"] = self.shard(embeds, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.shard(kwargs["position_ids"], -1)
        kwargs["attention_mask"] = None  # a packed row: cu_seqlens say where samples end
        mask = kwargs.get("visual_pos_masks")
        if mask is not None:  # Qwen3-VL deepstack: the features of the visual tokens in this shard
            before, inside = int(mask[:, :start].sum()), int(mask[:, start:stop].sum())
            kwargs["visual_pos_masks"] = self.shard(mask, 1)
            kwargs["deepstack_visual_embeds"] = [f[before : before + inside] for f in kwargs["deepstack_visual_embeds"]]
        return args, kwargs

    def _gather_router_logits(self, module: torch.nn.Module, args: tuple, output: Any):
        if active() is not self or getattr(output, "router_logits", None) is None:
            return None
        logits = output.router_logits
        # the padding's rows dropped: the whole row's loss, as one process computes it
        output.router_logits = tuple(self.gather_rows(t, [t.shape[0]] * self.size)[: self.real_length] for t in logits)
        return output
