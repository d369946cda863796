"""MDLM math in core/: schedules, masking statistics, what may be masked, normalisation, resume."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.config import ConfigError, MdlmArgs, ModelArgs, mdlm_model_args
from vltune.core.recipe import load_recipe
from vltune.core.contracts import IGNORE_INDEX, loss_denominator
from vltune.core.mdlm import (
    MaskedBatches,
    MdlmObjective,
    add_eos_tail,
    draw_mask,
    loss_weight,
    mask_probability,
    masked_batch,
    maskable_positions,
    sample_t,
)

MASK, IMAGE, VISION_START, VISION_END, PAD = 99, 90, 91, 92, 0
PROTECTED = np.array([IMAGE, VISION_START, VISION_END])


def _batch() -> dict:
    """Two right-padded rows: text prompt, a vision span, more prompt, then a response (labels set)."""
    row0 = [5, 6, VISION_START, IMAGE, IMAGE, IMAGE, VISION_END, 7, 8, 20, 21, 22, 23]
    row1 = [5, VISION_START, IMAGE, VISION_END, 9, 30, 31, PAD, PAD, PAD, PAD, PAD, PAD]
    input_ids = np.array([row0, row1], dtype=np.int64)
    labels = np.full_like(input_ids, IGNORE_INDEX)
    labels[0, 9:] = input_ids[0, 9:]
    labels[1, 5:7] = input_ids[1, 5:7]
    attention = np.array([[1] * 13, [1] * 7 + [0] * 6], dtype=np.int64)
    positions = np.where(attention.astype(bool), np.cumsum(attention, axis=1) - 1, 0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "position_ids": np.broadcast_to(positions, (3, 2, 13)).copy()}


def _objective(**kw) -> MdlmObjective:
    return MdlmObjective(MdlmArgs(**kw), MASK, tuple(PROTECTED.tolist()), (23, PAD), PAD, seed=3)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_weight_is_minus_alpha_prime_over_p_mask(schedule):
    t = np.linspace(0.01, 0.99, 50)
    h = 1e-6
    alpha = lambda x: 1.0 - mask_probability(x, schedule)  # noqa: E731
    derivative = (alpha(t + h) - alpha(t - h)) / (2 * h)
    np.testing.assert_allclose(loss_weight(t, schedule), -derivative / (1.0 - alpha(t)), rtol=1e-6)
    assert np.all(mask_probability(t, schedule) > 0) and mask_probability(1.0, schedule) == pytest.approx(1.0)
    if schedule == "linear":
        np.testing.assert_allclose(mask_probability(t, schedule), t)
        np.testing.assert_allclose(loss_weight(t, schedule), 1.0 / t)


def test_t_is_uniform_on_eps_to_one():
    t = sample_t(np.random.default_rng(0), 10_000, 1e-3)
    assert t.min() >= 1e-3 and t.max() < 1.0
    # mean and variance of U(eps, 1) within 5 standard errors
    assert abs(t.mean() - (1 + 1e-3) / 2) < 5 * np.sqrt((1 - 1e-3) ** 2 / 12 / 10_000)
    assert abs(np.quantile(t, 0.25) - (1e-3 + 0.25 * (1 - 1e-3))) < 0.02


def test_masked_fraction_matches_t_over_10k_draws():
    """Per row the masked count is Binomial(L_i, t_i): the standardised total stays within 4 sigma,
    and so does each decile of t."""
    rng = np.random.default_rng(1)
    maskable = np.zeros((10_000, 40), dtype=bool)
    lengths = rng.integers(1, 41, size=10_000)
    maskable[np.arange(40)[None] < lengths[:, None]] = True
    t = sample_t(rng, 10_000, 1e-3)
    masked = draw_mask(rng, maskable, t, "linear")
    counts = masked.sum(axis=1)
    expected, variance = lengths * t, lengths * t * (1 - t)
    assert abs((counts - expected).sum()) / np.sqrt(variance.sum()) < 4
    for lo in np.arange(0, 1, 0.1):
        rows = (t >= lo) & (t < lo + 0.1)
        z = (counts[rows] - expected[rows]).sum() / np.sqrt(variance[rows].sum())
        assert abs(z) < 4, (lo, z)
    assert not (masked & ~maskable).any()


@pytest.mark.parametrize("mask_prompt_loss", [True, False])
def test_prompt_and_vision_positions_are_never_masked(mask_prompt_loss):
    batch = _batch()
    objective = _objective(mask_prompt_loss=mask_prompt_loss)
    ever = np.zeros(batch["input_ids"].shape, dtype=bool)
    rng = np.random.default_rng(0)
    for _ in range(10_000 // 2):
        out = objective.mask(batch, rng)
        masked = out["input_ids"] == MASK
        ever |= masked
        np.testing.assert_array_equal(out["labels"][masked], batch["input_ids"][masked])
        assert (out["labels"][~masked] == IGNORE_INDEX).all() and (out["loss_weights"][~masked] == 0).all()
    vision = np.isin(batch["input_ids"], PROTECTED)
    padding = batch["attention_mask"] == 0
    assert not (ever & (vision | padding)).any()
    response = batch["labels"] != IGNORE_INDEX
    expected = response if mask_prompt_loss else ~vision & ~padding
    np.testing.assert_array_equal(ever, expected)  # every allowed position does get masked sometimes


def test_masked_batch_weights_and_denominators():
    batch = _batch()
    maskable = maskable_positions(batch, PROTECTED, True)  # L = 4 and 2
    masked = maskable.copy()
    masked[0, 9] = False
    t = np.array([0.5, 0.25])
    common = dict(mask_token_id=MASK, schedule="linear")
    seq = masked_batch(batch, t, masked, maskable, normalization="sequence", **common)
    np.testing.assert_allclose(seq["loss_weights"][0, 10:13], 2.0 / 4)
    np.testing.assert_allclose(seq["loss_weights"][1, 5:7], 4.0 / 2)
    assert seq["loss_weights"][0, 9] == 0 and loss_denominator(seq) == 2
    tok = masked_batch(batch, t, masked, maskable, normalization="token", **common)
    np.testing.assert_allclose(tok["loss_weights"][1, 5:7], 4.0)
    assert loss_denominator(tok) == 6
    assert loss_denominator(masked_batch(batch, t, masked, maskable, normalization="batch", **common)) == 2
    assert (seq["input_ids"][masked] == MASK).all() and (seq["input_ids"][~masked] == batch["input_ids"][~masked]).all()


def test_eos_tail_is_trained_text_after_each_row():
    batch = _batch()
    out, tail = add_eos_tail(batch, PAD)
    assert tail[1, 7:].all() and not tail[0].any()
    assert (out["attention_mask"] == 1).all()
    np.testing.assert_array_equal(out["position_ids"][:, 1, 7:], np.broadcast_to(np.arange(7, 13), (3, 6)))
    objective = _objective(train_eos_tail=True)
    masked = objective.mask(batch, np.random.default_rng(5))
    maskable_count = int(masked["loss_denominator"])
    assert maskable_count == 2  # sequence normalisation: one per row
    ever = np.zeros_like(tail)
    rng = np.random.default_rng(0)
    for _ in range(500):
        ever |= objective.mask(batch, rng)["input_ids"] == MASK
    assert ever[1, 7:].all()
    with pytest.raises(ValueError, match="right-padded"):
        left = {**batch, "attention_mask": batch["attention_mask"][:, ::-1].copy()}
        add_eos_tail(left, PAD)


def test_masked_batches_resume_draws_the_same_masks():
    batch = _batch()

    class Source:
        batches_per_epoch = 1

        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return batch

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    first = MaskedBatches(Source(), _objective())
    seen = [next(first)["input_ids"] for _ in range(5)]
    resumed = MaskedBatches(Source(), _objective())
    state = first.state_dict()
    assert state["mdlm_draws"] == 5
    replay = MaskedBatches(Source(), _objective())
    for expected in seen[:3]:
        np.testing.assert_array_equal(next(replay)["input_ids"], expected)
    resumed.load_state_dict(replay.state_dict())
    assert resumed.batches.i == 3 and resumed.draws == 3  # the wrapped source's state passes through
    np.testing.assert_array_equal(next(resumed)["input_ids"], seen[3])


def test_eval_masks_are_reproducible():
    batch = _batch()
    a, b = _objective().mask_for_eval(batch), _objective().mask_for_eval(batch)
    for key in ("input_ids", "labels", "loss_weights", "mdlm_t"):
        np.testing.assert_array_equal(a[key], b[key])


def test_freeze_flags_override_tune_flags_under_mdlm():
    flags = mdlm_model_args(ModelArgs(tune_mm_vision=True, tune_mm_mlp=True), MdlmArgs())
    assert not flags.tune_mm_vision and not flags.tune_mm_mlp and flags.tune_mm_llm
    flags = mdlm_model_args(ModelArgs(tune_mm_vision=True, tune_mm_mlp=True), MdlmArgs(freeze_vision=False, freeze_merger=False))
    assert flags.tune_mm_vision and flags.tune_mm_mlp


def test_recipe_keys_and_validation():
    cfg = load_recipe({"model_name_or_path": "m", "dataset_use": "d.jsonl", "objective": "mdlm", "loss_normalization": "token"})
    assert cfg.train.objective == "mdlm" and cfg.mdlm.loss_normalization == "token" and cfg.mdlm.mask_prompt_loss
    with pytest.raises(ConfigError) as err:
        load_recipe({"model_name_or_path": "m", "dataset_use": "d.jsonl", "objective": "mdlm", "noise_schedule": "square",
                     "loss_normalization": "row", "mdlm_eps": 0, "tune_mm_llm": False})
    for key in ("noise_schedule", "loss_normalization", "mdlm_eps", "tune_mm_llm"):
        assert key in str(err.value)
    with pytest.raises(ConfigError, match="eval_max_new_tokens"):
        load_recipe({"model_name_or_path": "m", "dataset_use": "d.jsonl", "eval_dataset": "e.jsonl", "objective": "mdlm",
                     "eval_max_new_tokens": 6, "mdlm_block_length": 4})
