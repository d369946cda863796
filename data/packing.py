"""Packing: several samples in one row with `cu_seqlens` (DESIGN.md's packed batch, B == 1), and the
bin packing behind `vltune pack` and online packing.

A padded batch of samples of very different lengths spends much of its compute on padding; a packed
row spends none. The row is exact, not an approximation, because every piece that could couple the
sub-sequences is cut at the boundaries:

* attention: the engine attends inside each `cu_seqlens[i]:cu_seqlens[i+1]` only (ops/torch/attention.py);
* positions: M-RoPE / Circle-RoPE ids restart at 0 per sub-sequence (core.rope2d.get_rope_index_packed);
* loss: the label at each sub-sequence's first token is -100, so the shifted next-token loss never
  asks the last token of one sample to predict the first of the next. A row's first label is never a
  target in the unpacked batch either, so the trained tokens (and the loop's normaliser, their count)
  are exactly those of the same samples unpacked.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.circle_rope import age_layer_mask
from ..core.contracts import IGNORE_INDEX, Batch
from ..core.rope2d import get_rope_index_packed
from .collate import rope_kwargs, vision_arrays
from .dataset import Features, SFTDataset
from .model_info import ModelInfo


def vision_cu_seqlens(batch: Batch, merge_size: int = 1) -> np.ndarray:
    """int32 [n_frames + 1]: patch boundaries of every image frame, then every video frame.

    The vision tower's full-attention segments (one per frame, as transformers' `get_vision_cu_seqlens`),
    for engines that run the tower themselves; the torch backend lets transformers derive the same.
    `merge_size` > 1 gives the boundaries in merged (LLM) tokens instead of patches.
    """
    grids = [batch[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch]
    if not grids:
        return np.zeros(1, dtype=np.int32)
    grid = np.concatenate(grids).astype(np.int64)
    per_frame = np.repeat(grid[:, 1] * grid[:, 2] // merge_size**2, grid[:, 0])
    return np.concatenate([[0], np.cumsum(per_frame)]).astype(np.int32)


def _flatten(items: Sequence[Features | Sequence[Features]]) -> list[Features]:
    out: list[Features] = []
    for item in items:
        out.extend(item if isinstance(item, (list, tuple)) else [item])
    return out


def collate_packed(
    features: Sequence[Features | Sequence[Features]],
    info: ModelInfo,
    circle_rope: dict | None = None,
) -> Batch:
    """Concatenate samples (or packs of samples: lists are flattened in order) into one [1, L] row.

    Returns input_ids / labels [1, L], cu_seqlens int32 [N+1], max_seqlen (0-d int64), position_ids
    [3, 1, L] restarting per sample (plus position_ids_alt under a mixed AGE strategy), rope_deltas [N, 1],
    the vision arrays in sample order and vision_cu_seqlens. No attention_mask: nothing is padding.
    """
    samples = _flatten(features)
    if not samples:
        raise ValueError("collate_packed: no samples")
    lengths = np.array([len(f.input_ids) for f in samples], dtype=np.int64)
    if lengths.min() == 0:
        raise ValueError("collate_packed: a sample has no tokens")
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    input_ids = np.concatenate([f.input_ids for f in samples]).astype(np.int64)[None]
    labels = np.concatenate([f.labels for f in samples]).astype(np.int64)[None]
    labels[0, cu_seqlens[:-1]] = IGNORE_INDEX  # no target across a boundary (see the module docstring)

    batch: Batch = {
        "input_ids": input_ids,
        "labels": labels,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": np.asarray(lengths.max(), dtype=np.int64),
    }
    batch.update(vision_arrays(samples))
    batch["vision_cu_seqlens"] = vision_cu_seqlens(batch)
    rope = rope_kwargs(batch, info)
    batch["position_ids"], batch["rope_deltas"] = get_rope_index_packed(input_ids, cu_seqlens, circle_rope=circle_rope, **rope)
    if circle_rope and not all(age_layer_mask(circle_rope.get("AGE_mode", "strategy_1"), info.rotary_layers)):
        batch["position_ids_alt"], batch["rope_deltas_alt"] = get_rope_index_packed(input_ids, cu_seqlens, **rope)
    return batch


@dataclass
class PackedCollator:
    """collate_packed with a model's settings bound: the training collate under data_flatten / data_packing."""

    info: ModelInfo
    circle_rope: dict | None = None

    def __call__(self, features: Sequence[Features | Sequence[Features]]) -> Batch:
        return collate_packed(features, self.info, self.circle_rope)


# -- bins ----------------------------------------------------------------------------------------


@dataclass
class Packing:
    """Bins of sample indices, and the samples longer than the capacity (each alone in a bin of its own)."""

    bins: list[list[int]]
    oversize: list[int]
    capacity: int
    lengths: np.ndarray

    @property
    def efficiency(self) -> float:
        """Tokens / capacity over the bins that hold no oversize sample (those are reported apart)."""
        regular = len(self.bins) - len(self.oversize)
        packed = int(self.lengths.sum()) - int(self.lengths[self.oversize].sum())
        return packed / (self.capacity * regular) if regular else 1.0


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> Packing:
    """Bin packing, longest first, each into the fullest bin it still fits (ties: the earliest bin).

    O(n log n) plus list inserts: 10k samples take well under a second. Samples longer than `capacity`
    get a bin each and are reported in `oversize`. Bins and their contents come out in a deterministic
    order (by first placement; within a bin, longest first).
    """
    if capacity <= 0:
        raise ValueError(f"pack length must be positive, got {capacity}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    oversize: list[int] = []
    # Open bins sorted by (remaining space, bin index); best fit = the first with room >= length.
    free: list[tuple[int, int]] = []
    for index in order.tolist():
        n = int(lengths[index])
        if n > capacity:
            oversize.append(index)
            bins.append([index])
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([index])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(index)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return Packing(bins, oversize, capacity, lengths)


def online_packs(lengths: Sequence[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Packs of at most `max_tokens` tokens (an over-long sample alone) for `max_tokens_per_batch`.

    The samples are shuffled (seeded) before best-fit decreasing so that equally long samples are not
    always grouped in file order; the loader then shuffles the packs every epoch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    shuffle = np.random.default_rng([seed, 7]).permutation(len(lengths))
    packing = best_fit_decreasing(lengths[shuffle], max_tokens)
    return [sorted(int(shuffle[i]) for i in b) for b in packing.bins]


def packs_of_samples(dataset: SFTDataset) -> list[list[int]]:
    """Dataset indices grouped by the pack they came in (a packed file's inner lists), in file order.

    Packs are told apart by file and index, so several packed files can be mixed; a sample that is not
    from a packed file is a pack of its own.
    """
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(dataset.samples):
        key = (sample.source.rpartition(":")[0], sample.pack) if sample.pack is not None else ("", "single", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class PackedDataset:
    """A dataset whose items are packs: item i is the Features of every sample of `packs[i]`.

    It stands in for SFTDataset in the loader (len and indexing), so the seeded epoch order, resumption
    and skipping work unchanged, on packs; a pack with a sample that fails while being built is skipped
    as a whole (and counted) under skip_bad_samples.
    """

    def __init__(self, dataset: SFTDataset, packs: list[list[int]]):
        if not packs or any(not p for p in packs):
            raise ValueError("PackedDataset needs non-empty packs")
        self.dataset = dataset
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[Features]:
        return [self.dataset[i] for i in self.packs[index]]


def packed_rows(
    dataset: SFTDataset,
    lengths: Sequence[int],
    *,
    data_packing: bool,
    max_tokens_per_batch: int,
    batch_size: int,
    seed: int,
) -> tuple[SFTDataset | PackedDataset, int]:
    """What the loader draws for packed training, and how many per micro-batch (all go in one row).

    data_packing: the packs of the packed files, `batch_size` of them per row. max_tokens_per_batch:
    packs made here to that budget, one per row. Otherwise (data_flatten): `batch_size` samples per row.
    `lengths` are the dataset's token counts (the validation pass measured them before step 1).
    """
    if len(lengths) != len(dataset):
        raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")
    if data_packing:
        return PackedDataset(dataset, packs_of_samples(dataset)), batch_size
    if max_tokens_per_batch:
        return PackedDataset(dataset, online_packs(lengths, max_tokens_per_batch, seed)), 1
    return dataset, batch_size
