"""core/sequence_parallel.py: the row padding, shards, image split, head checks and memory model, and the
recipe rules for sequence_parallel_size (numpy only; the engine is tested in tests/integration)."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.config import ConfigError
from vltune.core.contracts import IGNORE_INDEX
from vltune.core.recipe import load_recipe
from vltune.core.sequence_parallel import (SequenceLayout, activation_bytes, head_problems, media_split, pad_row,
                                           shard_bounds, shard_trained_positions)


def _row(length: int) -> dict:
    ids = np.arange(10, 10 + length)[None]
    labels = ids.copy()
    labels[0, :2] = IGNORE_INDEX
    positions = np.broadcast_to(np.arange(length), (3, 1, length)).copy()
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "cu_seqlens": np.array([0, 4, length], dtype=np.int32), "max_seqlen": np.int64(length - 4)}


def test_pad_row_adds_a_sample_of_its_own_with_nothing_trained():
    row = pad_row(_row(9), 4, pad_token_id=7)
    assert row["input_ids"].shape == (1, 12) and list(row["input_ids"][0, 9:]) == [7, 7, 7]
    assert (row["labels"][0, 9:] == IGNORE_INDEX).all()
    assert row["position_ids"].shape == (3, 1, 12) and (row["position_ids"][..., 9:] == 0).all()
    assert list(row["cu_seqlens"]) == [0, 4, 9, 12] and row["cu_seqlens"].dtype == np.int32
    assert int(row["max_seqlen"]) == 5
    np.testing.assert_array_equal(row["labels"][:, :9], _row(9)["labels"])  # the real tokens untouched


def test_pad_row_leaves_a_multiple_alone_and_needs_packing():
    row = _row(8)
    assert pad_row(row, 4, pad_token_id=0) is row
    with pytest.raises(ValueError, match="packed rows"):
        pad_row({"input_ids": np.zeros((1, 5))}, 2, pad_token_id=0)


def test_shards_cover_the_row_and_targets_cross_shard_borders():
    assert [shard_bounds(12, 3, r) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="pad_row first"):
        shard_bounds(10, 4, 0)
    labels = np.full((1, 8), IGNORE_INDEX)
    labels[0, 4] = 5  # the target of position 3, the last of shard 0
    labels[0, 7] = 6
    assert list(shard_trained_positions(labels, 0, 4)) == [3]
    assert list(shard_trained_positions(labels, 4, 8)) == [2]  # shard-local: position 6 predicts 7
    # over both shards exactly the positions the whole row trains
    whole = np.flatnonzero(labels[0, 1:] != IGNORE_INDEX)
    halves = np.concatenate([shard_trained_positions(labels, 0, 4), 4 + shard_trained_positions(labels, 4, 8)])
    np.testing.assert_array_equal(whole, halves)


def test_media_split_balances_patches_with_whole_images():
    assert media_split([16, 16, 16, 16], 2) == [(0, 2), (2, 4)]
    assert media_split([64, 4, 4, 4], 2) == [(0, 1), (1, 4)]
    assert media_split([16], 2) == [(0, 1), (1, 1)]  # fewer images than ranks: rank 1 encodes none
    assert media_split([], 3) == [(0, 0), (0, 0), (0, 0)]
    shares = media_split([4, 8, 12, 4, 20, 4, 8], 3)
    assert shares[0][0] == 0 and shares[-1][1] == 7
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))


def test_layout_groups_are_consecutive_and_data_parallel_strided():
    layout = SequenceLayout.of(5, 8, 2)
    assert (layout.rank, layout.dp_rank, layout.dp_size) == (1, 2, 4)
    assert layout.group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.data_parallel_ranks() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="must divide the number of processes"):
        SequenceLayout.of(0, 6, 4)


def test_head_problems_name_each_count_that_does_not_divide():
    config = {"text_config": {"num_attention_heads": 16, "num_key_value_heads": 2,
                              "linear_num_key_heads": 16, "linear_num_value_heads": 32}}
    assert head_problems(config, 2) == []
    problems = head_problems(config, 4)
    assert len(problems) == 1 and "num_key_value_heads (2) must divide by it" in problems[0]
    assert head_problems({"num_attention_heads": 12}, 8)[0].startswith("sequence_parallel_size 8: the language model's num_attention_heads (12)")


def test_activation_memory_model_shrinks_with_the_group_but_not_the_whole_row():
    one = activation_bytes(65536, 2048, 36, 1, heads=16, intermediate=11008)
    two = activation_bytes(65536, 2048, 36, 2, heads=16, intermediate=11008)
    assert two["whole_row_bytes"] == one["whole_row_bytes"]
    assert two["layer_inputs_bytes"] == one["layer_inputs_bytes"] / 2
    assert two["recomputed_layer_bytes"] == one["recomputed_layer_bytes"] / 2
    assert 0.5 < two["per_rank_bytes"] / one["per_rank_bytes"] < 0.6


@pytest.mark.parametrize("overrides, message", [
    ({"sequence_parallel_size": 2}, "shards packed rows: set data_packing: true"),
    ({"sequence_parallel_size": 0, "data_flatten": True}, "sequence_parallel_size: 0 must be >= 1"),
    ({"sequence_parallel_size": 2, "data_flatten": True, "backend": "mindspore"}, "is for backend: torch"),
    ({"sequence_parallel_size": 2, "data_flatten": True, "objective": "mdlm"}, "is for objective: ar"),
    ({"sequence_parallel_size": "two"}, "sequence_parallel_size"),
])
def test_recipe_rules_refuse_what_cannot_shard(tmp_path, overrides, message):
    recipe = {"model_name_or_path": str(tmp_path), "dataset_use": "x.jsonl", **overrides}
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe)
