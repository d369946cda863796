"""data/packing.py and data/pack_annotation.py: packed rows, bin packing, the packed file and its cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vltune.core.contracts import IGNORE_INDEX, count_trained_tokens
from vltune.data.collate import collate_padded
from vltune.data.dataset import SFTDataset
from vltune.data.formats import read_annotation
from vltune.data.loader import BatchIterator
from vltune.data.pack_annotation import CountSettings, pack_annotation, packed_output_path
from vltune.data.packing import (
    PackedCollator,
    PackedDataset,
    best_fit_decreasing,
    collate_packed,
    online_packs,
    packed_rows,
    packs_of_samples,
)


def long_tailed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts shaped like SFT data: lognormal body (median ~300), a tail past 4k, a floor of 20."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.7, 0.9, n), 20, 6000).astype(np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip("av")
    from vltune.data.synthetic_corpus import write_format_corpus

    out = tmp_path_factory.mktemp("corpus")
    files = write_format_corpus(out, num_samples=20, seed=0)
    return {"dir": out, "files": files, "samples": [s for f in files for s in read_annotation(f).samples]}


def test_packed_row_restarts_positions_and_cuts_targets_at_boundaries(tiny_qwen2_5_vl, corpus):
    dataset = SFTDataset(corpus["samples"][:8], tiny_qwen2_5_vl, max_length=4096, max_pixels=28 * 28 * 16)
    features = [dataset[i] for i in range(8)]
    packed = collate_packed(features, dataset.info)
    lengths = [len(f.input_ids) for f in features]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["cu_seqlens"].dtype == np.int32 and packed["cu_seqlens"].tolist() == np.cumsum([0] + lengths).tolist()
    assert int(packed["max_seqlen"]) == max(lengths)
    for i, f in enumerate(features):
        a, b = packed["cu_seqlens"][i], packed["cu_seqlens"][i + 1]
        alone = collate_padded([f], dataset.info, pad_token_id=0)
        np.testing.assert_array_equal(packed["position_ids"][:, 0, a:b], alone["position_ids"][:, 0])
        np.testing.assert_array_equal(packed["input_ids"][0, a:b], f.input_ids)
        assert packed["labels"][0, a] == IGNORE_INDEX
        np.testing.assert_array_equal(packed["labels"][0, a + 1 : b], f.labels[1:])
    assert count_trained_tokens(packed) == sum(count_trained_tokens(collate_padded([f], dataset.info, 0)) for f in features)
    # One frame per image, t frames per video: the tower's full-attention segments.
    grids = np.concatenate([packed[k] for k in ("image_grid_thw", "video_grid_thw") if k in packed])
    frames = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
    assert packed["vision_cu_seqlens"].tolist() == np.cumsum([0, *frames]).tolist()
    assert int(packed["vision_cu_seqlens"][-1]) == len(packed["pixel_values"]) + len(packed.get("pixel_values_videos", []))


def test_best_fit_decreasing_places_every_sample_once_within_capacity():
    lengths = long_tailed_lengths(3000, seed=1)
    packing = best_fit_decreasing(lengths, 4096)
    placed = sorted(i for b in packing.bins for i in b)
    assert placed == list(range(len(lengths)))
    assert sorted(packing.oversize) == sorted(np.flatnonzero(lengths > 4096).tolist()) and packing.oversize
    for b in packing.bins:
        assert len(b) == 1 if b[0] in packing.oversize else lengths[b].sum() <= 4096
    assert best_fit_decreasing([3, 3, 2, 2, 2], 6).bins == [[0, 1], [2, 3, 4]]  # best fit, longest first


def test_best_fit_decreasing_reaches_097_on_10k_long_tailed_samples():
    packing = best_fit_decreasing(long_tailed_lengths(10_000), 4096)
    assert packing.efficiency >= 0.97, packing.efficiency


def test_online_packs_respect_the_budget_and_the_seed():
    lengths = long_tailed_lengths(500, seed=2)
    packs = online_packs(lengths, 2048, seed=5)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(len(p) == 1 or lengths[p].sum() <= 2048 for p in packs)
    assert packs == online_packs(lengths, 2048, seed=5)


@pytest.mark.parametrize("name, n, output, expected", [
    ("train.jsonl", 4096, None, "train_packed4096.json"),
    ("train.json", 512, None, "train_packed512.json"),
    ("train_packed4096.json", 2048, None, "train_packed2048.json"),
    ("train.jsonl", 4096, "out/p", "out/p.json"),
    ("train.jsonl", 4096, "out/p.json", "out/p.json"),
])
def test_output_names_do_not_double_suffixes(tmp_path, name, n, output, expected):
    out = packed_output_path(tmp_path / name, n, tmp_path / output if output else None)
    assert out == tmp_path / expected
    with pytest.raises(ValueError, match="JSON list"):
        packed_output_path(tmp_path / name, n, tmp_path / "x.jsonl")


def test_pack_file_counts_as_training_and_reads_back_as_packs(tiny_qwen2_5_vl, corpus, tmp_path):
    llava = corpus["files"][0]
    settings = CountSettings(str(tiny_qwen2_5_vl), max_pixels=28 * 28 * 16)
    summary, counts = pack_annotation(llava, 300, settings, cache_dir=tmp_path / "cache")
    assert summary["written"] and summary["errors"] == 0 and summary["cached"] == 0
    assert summary["samples"] == len(read_annotation(llava).samples) == len(counts.counted)
    # The count is the training count: the same dataset decoded, sample by sample.
    dataset = SFTDataset(read_annotation(llava).samples, tiny_qwen2_5_vl, max_length=1 << 40, max_pixels=28 * 28 * 16)
    assert [n for _, _, n in counts.counted] == [len(dataset[i].input_ids) for i in range(len(dataset))]
    out = packed_output_path(llava, 300)
    assert summary["output"] == str(out)
    packs = json.loads(out.read_text())
    assert len(packs) == summary["bins"] and sum(len(p) for p in packs) == summary["samples"]
    back = read_annotation(out).samples
    assert {s.id for s in back} == {s.id for s in dataset.samples}
    by_id = {s.id: n for s, (_, _, n) in zip(dataset.samples, counts.counted)}
    for group in packs_of_samples(SFTDataset(back, tiny_qwen2_5_vl, max_length=4096)):
        total = sum(by_id[back[i].id] for i in group)
        assert total <= 300 or len(group) == 1
    assert len({s.pack for s in back}) == len(packs)

    again, _ = pack_annotation(llava, 500, settings, cache_dir=tmp_path / "cache")
    assert again["cached"] == again["samples"] and again["output"].endswith("llava_packed500.json")


def test_bad_samples_stop_the_pack_unless_skipped(tiny_qwen2_5_vl, tmp_path):
    records = [
        {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "bad", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
    ]
    annotation = tmp_path / "a.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = CountSettings(str(tiny_qwen2_5_vl))
    summary, counts = pack_annotation(annotation, 128, settings)
    assert not summary["written"] and summary["errors"] == 1 and "bad" in str(counts.errors[0])
    assert not packed_output_path(annotation, 128).exists()
    summary, _ = pack_annotation(annotation, 128, settings, skip_bad_samples=True)
    assert summary["written"] and summary["samples"] == 1 and summary["errors"] == 1


def test_packed_dataset_feeds_the_loader_one_row_per_pack(tiny_qwen2_5_vl, corpus, tmp_path):
    summary, _ = pack_annotation(corpus["files"][0], 256, CountSettings(str(tiny_qwen2_5_vl), max_pixels=28 * 28 * 16))
    dataset = SFTDataset(read_annotation(summary["output"]).samples, tiny_qwen2_5_vl, max_length=4096, max_pixels=28 * 28 * 16)
    lengths = [dataset.check(i)[0] for i in range(len(dataset))]
    rows, per_row = packed_rows(dataset, lengths, data_packing=True, max_tokens_per_batch=0, batch_size=1, seed=0)
    assert isinstance(rows, PackedDataset) and len(rows) == summary["bins"] and per_row == 1
    batches = BatchIterator(rows, per_row, PackedCollator(dataset.info), seed=0)
    for _ in range(len(rows)):
        pack = rows.packs[int(batches._order[batches.position])]
        batch = next(batches)
        assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seqlens"]) == len(pack) + 1
        assert batch["input_ids"].shape[1] == sum(lengths[i] for i in pack)
    online, per_row = packed_rows(dataset, lengths, data_packing=False, max_tokens_per_batch=300, batch_size=4, seed=0)
    assert per_row == 1 and all(len(p) == 1 or sum(lengths[i] for i in p) <= 300 for p in online.packs)
    flat, per_row = packed_rows(dataset, lengths, data_packing=False, max_tokens_per_batch=0, batch_size=4, seed=0)
    assert flat is dataset and per_row == 4
