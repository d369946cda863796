"""Tests for the deterministic synthetic VQA generator (vltune.data.synthetic)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from vltune.data.synthetic import (
    ANSWER_SETS,
    COLORS,
    TASKS,
    SyntheticVQAConfig,
    generate_vqa_dataset,
    make_sample,
)

N_SAMPLES = 400


def _samples(task: str, n: int = N_SAMPLES, seed: int = 123, image_size: int = 112):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, task, image_size) for _ in range(n)]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _small_config(**overrides) -> SyntheticVQAConfig:
    kwargs = dict(num_train=12, num_eval=4, image_size=64, tasks=TASKS, seed=0)
    kwargs.update(overrides)
    return SyntheticVQAConfig(**kwargs)


def test_generation_is_byte_identical(tmp_path):
    config = _small_config()
    generate_vqa_dataset(tmp_path / "a", config)
    generate_vqa_dataset(tmp_path / "b", config)
    hashes_a, hashes_b = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert "train.jsonl" in hashes_a and "eval.jsonl" in hashes_a
    assert len([k for k in hashes_a if k.startswith("images")]) == 16
    assert hashes_a == hashes_b


def test_different_seeds_differ(tmp_path):
    generate_vqa_dataset(tmp_path / "s0", _small_config(seed=0))
    generate_vqa_dataset(tmp_path / "s1", _small_config(seed=1))
    h0, h1 = _tree_hashes(tmp_path / "s0"), _tree_hashes(tmp_path / "s1")
    assert h0["train.jsonl"] != h1["train.jsonl"]
    assert h0["images/train_00000.png"] != h1["images/train_00000.png"]


def test_train_and_eval_use_different_streams(tmp_path):
    generate_vqa_dataset(tmp_path, _small_config(num_train=4, num_eval=4))
    for i in range(4):
        train = (tmp_path / "images" / f"train_{i:05d}.png").read_bytes()
        evals = (tmp_path / "images" / f"eval_{i:05d}.png").read_bytes()
        assert train != evals


def test_jsonl_format_and_return_value(tmp_path):
    config = _small_config()
    info = generate_vqa_dataset(tmp_path, config)
    assert info["data_path"] == str(tmp_path)
    assert info["num_train"] == 12 and info["num_eval"] == 4
    assert list(info["tasks"]) == list(TASKS)
    for split, n in (("train", 12), ("eval", 4)):
        lines = Path(info[f"{split}_file"]).read_text().splitlines()
        assert len(lines) == n
        for i, line in enumerate(lines):
            rec = json.loads(line)
            assert rec["id"] == f"{split}_{i:05d}"
            assert rec["image"] == f"images/{split}_{i:05d}.png"
            assert (tmp_path / rec["image"]).is_file()
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"] in ANSWER_SETS[rec["task"]]
    tasks_seen = {json.loads(l)["task"] for l in Path(info["train_file"]).read_text().splitlines()}
    assert tasks_seen == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_answers_within_fixed_answer_set(task):
    answers = Counter(answer for _, _, answer in _samples(task))
    assert set(answers) <= set(ANSWER_SETS[task])
    assert set(answers) == set(ANSWER_SETS[task])  # every class actually occurs


def test_color_task_is_near_chance_balanced():
    answers = Counter(answer for _, _, answer in _samples("color"))
    assert set(answers) == set(COLORS) and len(COLORS) == 8
    assert max(answers.values()) / N_SAMPLES <= 0.25


@pytest.mark.parametrize("task", TASKS)
def test_answer_not_predictable_from_question(task):
    """A question-only 'model' (majority answer per question string, fitted on one
    sample set and scored on another) must stay near chance, and every question
    string seen often enough must come with more than one answer."""
    fit, held_out = _samples(task, seed=1), _samples(task, seed=2)
    by_question: dict[str, Counter] = defaultdict(Counter)
    for _, question, answer in fit:
        by_question[question][answer] += 1
    assert len(by_question) >= 2  # several phrasings
    for question, answers in by_question.items():
        if sum(answers.values()) >= 5:
            assert len(answers) >= 2, f"question {question!r} always has answer {set(answers)}"

    global_majority = Counter(a for _, _, a in fit).most_common(1)[0][0]
    correct = sum(
        (by_question[q].most_common(1)[0][0] if q in by_question else global_majority) == a
        for _, q, a in held_out
    )
    chance = 1.0 / len(ANSWER_SETS[task])
    assert correct / len(held_out) <= chance + 0.1


def test_shapes_are_visible_in_the_answer_color():
    image_size = 112
    min_pixels = int(0.02 * image_size * image_size)
    for image, _, answer in _samples("color", n=100, image_size=image_size):
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        pixels = np.asarray(image)
        matches = np.all(pixels == np.array(COLORS[answer], dtype=np.uint8), axis=-1)
        assert matches.sum() >= min_pixels, f"{answer} shape covers only {matches.sum()} px"
        # No other palette colour may appear: the background never equals a shape colour.
        for name, rgb in COLORS.items():
            if name != answer:
                assert not np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1).any()


def test_shapes_stay_inside_the_image():
    for task in TASKS:
        for image, _, _ in _samples(task, n=100, image_size=64):
            pixels = np.asarray(image)
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            for rgb in COLORS.values():
                assert not np.all(border == np.array(rgb, dtype=np.uint8), axis=-1).any()


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="bogus") as excinfo:
        SyntheticVQAConfig(tasks=("color", "bogus"))
    assert "position" in str(excinfo.value)  # lists the valid tasks
    with pytest.raises(ValueError, match="bogus"):
        make_sample(np.random.default_rng(0), "bogus", 112)


def test_skip_regeneration(tmp_path, monkeypatch):
    import vltune.data.synthetic as synthetic

    config = _small_config()
    first = generate_vqa_dataset(tmp_path, config)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["config"]["seed"] == 0 and info["config"]["tasks"] == list(TASKS)

    def fail(*args, **kwargs):
        raise AssertionError("dataset was regenerated although it is up to date")

    monkeypatch.setattr(synthetic, "_write_split", fail)
    assert generate_vqa_dataset(tmp_path, config) == first
    monkeypatch.undo()

    # A changed config or a missing file triggers regeneration.
    calls = []
    real_write_split = synthetic._write_split
    monkeypatch.setattr(synthetic, "_write_split", lambda *a: calls.append(a[1]) or real_write_split(*a))
    generate_vqa_dataset(tmp_path, _small_config(seed=5))
    assert calls == ["train", "eval"]
    (tmp_path / "images" / "eval_00003.png").unlink()
    generate_vqa_dataset(tmp_path, _small_config(seed=5))
    assert calls == ["train", "eval", "train", "eval"]
    assert (tmp_path / "images" / "eval_00003.png").is_file()
