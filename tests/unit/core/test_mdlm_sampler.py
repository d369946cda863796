"""The masked-diffusion sampler's loop against a scripted proposal (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.mdlm_sampler import SamplerSettings, append_canvas, diffusion_generate, reveal_counts

MASK, END = 50, 7


def _prompt_batch() -> dict:
    """Two left-padded prompts of 3 and 5 tokens."""
    ids = np.array([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], dtype=np.int64)
    attention = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    positions = np.where(attention.astype(bool), np.cumsum(attention, axis=1) - 1, 0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": np.broadcast_to(positions, (3, 2, 5)).copy()}


def scripted(answer: np.ndarray, confidence: np.ndarray | None = None):
    """A proposal that always proposes `answer` [B, N] with fixed (or position-decreasing) confidences,
    and records the canvases it was shown."""
    seen = []

    def propose(batch, keep, temperature, rng):
        seen.append(batch["input_ids"][:, -keep:].copy())
        conf = confidence if confidence is not None else np.broadcast_to(-np.arange(keep, dtype=float), answer.shape)
        return answer.copy(), np.array(conf, dtype=np.float32)

    return propose, seen


@pytest.mark.parametrize("n, steps", [(32, 32), (32, 8), (6, 4), (5, 5), (7, 3)])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_reveal_counts_cover_the_block(n, steps, schedule):
    counts = reveal_counts(n, steps, schedule)
    assert len(counts) == steps and sum(counts) == n and min(counts) >= 0
    if schedule == "linear" and steps == n:
        assert counts == [1] * n


def test_canvas_continues_each_rows_text_positions():
    canvas = append_canvas(_prompt_batch(), 4, MASK)
    assert (canvas["input_ids"][:, 5:] == MASK).all() and (canvas["attention_mask"][:, 5:] == 1).all()
    np.testing.assert_array_equal(canvas["position_ids"][0, 0, 5:], [3, 4, 5, 6])
    np.testing.assert_array_equal(canvas["position_ids"][2, 1, 5:], [5, 6, 7, 8])


def test_steps_equal_n_and_block_one_reveal_exactly_one_token_per_step():
    answer = np.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    propose, seen = scripted(answer)
    after = []
    out = diffusion_generate(propose, _prompt_batch(), SamplerSettings(6, block_length=1, steps=6),
                             mask_token_id=MASK, end_token_ids=(END,), rng=np.random.default_rng(0), on_step=after.append)
    assert out == answer.tolist()
    masks_left = [int((g == MASK).sum(axis=1)[0]) for g in after]
    assert masks_left == [5, 4, 3, 2, 1, 0] and len(seen) == 6
    for step, g in enumerate(after):  # block 1: left to right
        assert (g[:, : step + 1] != MASK).all() and (g[:, step + 1 :] == MASK).all()


def test_low_confidence_commits_the_most_confident_and_never_remasks():
    answer = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    confidence = np.array([[0.1, 0.9, 0.5, 0.7], [0.8, 0.1, 0.2, 0.3]])
    after = []
    propose, _ = scripted(answer, confidence)
    diffusion_generate(propose, _prompt_batch(), SamplerSettings(4, block_length=4, steps=4),
                       mask_token_id=MASK, end_token_ids=(END,), rng=np.random.default_rng(0), on_step=after.append)
    first_commit = [np.flatnonzero(after[0][r] != MASK).tolist() for r in range(2)]
    assert first_commit == [[1], [0]]
    for before, later in zip(after, after[1:]):
        assert ((before != MASK) <= (later != MASK)).all()  # committed tokens stay committed
        assert (later[before != MASK] == before[before != MASK]).all()


def test_only_the_current_block_is_filled():
    answer = np.arange(1, 9)[None].repeat(2, axis=0)
    after = []
    propose, _ = scripted(answer, np.ones((2, 8)))
    diffusion_generate(propose, _prompt_batch(), SamplerSettings(8, block_length=4, steps=4),
                       mask_token_id=MASK, end_token_ids=(END,), rng=np.random.default_rng(0), on_step=after.append)
    assert all((g[:, 4:] == MASK).all() for g in after[:2]) and (after[1][:, :4] != MASK).all()


def test_stops_after_the_block_where_every_row_ended_and_cuts_at_the_end_token():
    answer = np.array([[1, END, 3, 4, 5, 6, 7, 8], [1, 2, END, 4, 5, 6, 7, 8]])
    propose, seen = scripted(answer)
    out = diffusion_generate(propose, _prompt_batch(), SamplerSettings(8, block_length=4, steps=8),
                             mask_token_id=MASK, end_token_ids=(END,), rng=np.random.default_rng(0))
    assert out == [[1], [1, 2]] and len(seen) == 4  # the second block never ran


def test_random_remasking_is_seeded():
    answer = np.array([[1, 2, 3, 4, 5, 6]] * 2)

    def run(seed):
        after = []
        propose, _ = scripted(answer)
        diffusion_generate(propose, _prompt_batch(), SamplerSettings(6, block_length=6, steps=6, remasking="random"),
                           mask_token_id=MASK, end_token_ids=(END,), rng=np.random.default_rng(seed), on_step=after.append)
        return np.stack(after)

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_settings_errors_say_what_to_fit():
    with pytest.raises(ValueError, match="multiple of block_length"):
        SamplerSettings(6, block_length=4).resolved()
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        SamplerSettings(8, block_length=2, steps=6).resolved()
    assert SamplerSettings(6, block_length=32).resolved().block_length == 6
    assert SamplerSettings(6).resolved().steps == 6
