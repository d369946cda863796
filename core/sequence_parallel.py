"""Sequence parallelism (DeepSpeed-Ulysses) without a framework: what every engine shares, in numpy.

With `sequence_parallel_size: N` the world of W ranks is split into W / N sequence groups of N
consecutive ranks (peers on one host, where the all-to-all is cheapest); the ranks of one group hold
the same packed row and each runs the decoder on one contiguous shard of its tokens. Data parallelism
runs over the groups: rank r reads the data of data-parallel rank r // N. Attention needs every token
of a sample, so the engine exchanges shards for heads before it (all-to-all) and back after it; the
rest of a decoder layer is per token. What stays here, backend-neutral:

* `pad_row`: a packed row padded to a multiple of N, the padding a sample of its own (`cu_seqlens`)
  with no trained token, so the loss and every real sample's attention are unchanged.
* `shard_bounds`: which tokens a rank holds; `media_split`: which images a rank encodes (the vision
  tower runs once per row, its images split over the group by patch count, and the features gathered).
* `head_problems`: the head counts that must divide by N (heads are what the all-to-all splits).
* `activation_bytes`: the memory model in docs/distributed.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contracts import IGNORE_INDEX, Batch

TOKEN_KEYS = ("input_ids", "labels", "attention_mask", "loss_weights")
"""Per-token [B, L] arrays of a batch; positions ([3, B, L]) are padded on their last axis as well."""


@dataclass(frozen=True)
class SequenceLayout:
    """Where a rank stands: its sequence group of `size` ranks (position `rank` in it) and its data-parallel
    coordinates (`dp_rank` of `dp_size` groups)."""

    size: int
    rank: int
    dp_rank: int
    dp_size: int

    @classmethod
    def of(cls, world_rank: int, world_size: int, size: int) -> "SequenceLayout":
        if size < 1 or world_size % size:
            raise ValueError(f"sequence_parallel_size {size} must divide the number of processes ({world_size})")
        return cls(size=size, rank=world_rank % size, dp_rank=world_rank // size, dp_size=world_size // size)

    def group_ranks(self) -> list[list[int]]:
        """The world ranks of every sequence group (consecutive), in the order every rank must create them."""
        return [list(range(start, start + self.size)) for start in range(0, self.size * self.dp_size, self.size)]

    def data_parallel_ranks(self) -> list[list[int]]:
        """The world ranks of every data-parallel group (the same position in each sequence group)."""
        return [list(range(offset, self.size * self.dp_size, self.size)) for offset in range(self.size)]


def pad_row(batch: Batch, size: int, pad_token_id: int) -> Batch:
    """A packed [1, L] row padded to a multiple of `size` tokens. The padding is one more sample in
    `cu_seqlens` (it attends only to itself, and a recurrent layer restarts before it), its labels are
    -100 and its positions 0, so no real sample's output or the loss can change."""
    if "cu_seqlens" not in batch:
        raise ValueError("sequence parallelism shards packed rows: the batch has no cu_seqlens (data_packing or data_flatten)")
    length = batch["input_ids"].shape[-1]
    extra = -length % size
    if extra == 0:
        return batch
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 1, "loss_weights": 0}
    out = dict(batch)
    for key, value in fill.items():
        if key in batch:
            array = np.asarray(batch[key])
            out[key] = np.concatenate([array, np.full((*array.shape[:-1], extra), value, dtype=array.dtype)], axis=-1)
    for key in ("position_ids", "position_ids_alt"):
        if batch.get(key) is not None:
            array = np.asarray(batch[key])
            out[key] = np.concatenate([array, np.zeros((*array.shape[:-1], extra), dtype=array.dtype)], axis=-1)
    cu = np.asarray(batch["cu_seqlens"])
    out["cu_seqlens"] = np.concatenate([cu, np.asarray([length + extra], dtype=cu.dtype)])
    out["max_seqlen"] = max(int(batch["max_seqlen"]), extra)
    return out


def shard_bounds(length: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of a row of `length` tokens (a multiple of `size`)."""
    if length % size:
        raise ValueError(f"a row of {length} tokens does not split into {size} equal shards (pad_row first)")
    shard = length // size
    return rank * shard, (rank + 1) * shard


def shard_trained_positions(labels: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Positions p in [start, stop) (shard-local, p - start) whose next token labels[:, p + 1] is trained:
    where this shard's LM head must run. The target of a shard's last position is the next shard's
    first token, read from the whole row every rank holds."""
    labels = np.asarray(labels)
    following = labels[:, start + 1 : stop + 1]
    trained = (following != IGNORE_INDEX).any(axis=0)
    return np.flatnonzero(trained)


def media_split(patches_per_item: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Contiguous [first, last) item ranges, one per rank, with patch counts as even as whole items allow
    (greedy over the cumulative count: rank r takes the items whose patches start before (r + 1) / N of
    the total). A rank may get none when there are fewer items than ranks."""
    counts = np.asarray(patches_per_item, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, dtype=np.int64)
    total = int(counts.sum())
    bounds = [0]
    for r in range(1, size):
        bounds.append(int(np.searchsorted(starts, total * r / size, side="left")) if total else 0)
    bounds.append(len(counts))  # non-decreasing: searchsorted over ascending starts
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(size)]


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config.get("llm_config") or config


def head_problems(config: dict, size: int) -> list[str]:
    """What stops the all-to-all from splitting this model's heads over `size` ranks (config.json's dict)."""
    text = _text_config(config)
    counts = {
        "num_attention_heads": text.get("num_attention_heads"),
        "num_key_value_heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "linear_num_key_heads": text.get("linear_num_key_heads"),
        "linear_num_value_heads": text.get("linear_num_value_heads"),
    }
    return [
        f"sequence_parallel_size {size}: the language model's {key} ({value}) must divide by it (each rank of a "
        "sequence group attends with an equal share of the heads)"
        for key, value in counts.items()
        if value is not None and int(value) % size
    ]


def model_head_problems(model_dir: str | Path, size: int) -> list[str]:
    """head_problems of a model directory's config.json, read before any weight loads."""
    return head_problems(json.loads((Path(model_dir) / "config.json").read_text()), size)


def activation_bytes(tokens: int, hidden: int, layers: int, size: int, *, bytes_per_value: int = 2,
                     checkpointing: bool = True, intermediate: int | None = None, heads: int = 1,
                     head_dim: int | None = None, vocab: int = 0) -> dict[str, float]:
    """Activation memory of one rank for a row of `tokens` (docs/distributed.md's model).

    With gradient checkpointing a layer keeps only its input (tokens/N x hidden) until backward, and one
    layer at a time is recomputed whole: its attention inputs and outputs (q, k, v, o: 4 x tokens/N x
    heads x head_dim, the all-to-all buffers of the same size once more), its MLP (3 x tokens/N x
    intermediate) and norms/residuals (about 4 x tokens/N x hidden). Without checkpointing every layer
    keeps all of that. The LM head's logits of the shard's positions and their gradient (2 x tokens/N x
    vocab, at most; fewer where positions are untrained). The embeddings of the whole row (tokens x
    hidden) are held by every rank: the part that does not shrink with N."""
    intermediate = intermediate or 4 * hidden
    head_dim = head_dim or hidden // heads
    local = tokens / size
    attention = 4 * local * heads * head_dim * 2
    per_layer = attention + 3 * local * intermediate + 4 * local * hidden
    kept = layers * local * hidden if checkpointing else layers * per_layer
    recomputed = per_layer if checkpointing else 0.0
    row = tokens * hidden
    logits = 2 * local * vocab
    total = (kept + recomputed + logits + row) * bytes_per_value
    return {"per_rank_bytes": total, "layer_inputs_bytes": kept * bytes_per_value,
            "recomputed_layer_bytes": recomputed * bytes_per_value, "logits_bytes": logits * bytes_per_value,
            "whole_row_bytes": row * bytes_per_value}
