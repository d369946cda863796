"""Masked diffusion (MDLM) training math for a VLM, in numpy (REFERENCE.md s4).

Why numpy and why here: the random masking is drawn once, from a seeded generator, on the numpy
batch, so the torch and MindSpore engines see byte-identical masked batches; a backend only adds
the bidirectional forward and the weighted cross-entropy.

A masked batch is an ordinary batch (DESIGN.md's contract) plus:

* `input_ids`   the masked positions replaced by the mask token id;
* `labels`      the clean token at each masked position, -100 elsewhere, *not* shifted (a diffusion
                model predicts the token at its own position);
* `loss_weights` float32 [B, L]: w(t_i) (1/t_i for the linear schedule) times the row's
                normalisation factor at masked positions, 0 elsewhere;
* `loss_denominator` int64 scalar: this micro-batch's share of the loss denominator, which the loop
                sums over the accumulated micro-batches (core.contracts.loss_denominator);
* `mdlm_t`      float64 [B], the noise level drawn for each row.

The loss is sum(loss_weights * CE) / sum(loss_denominator) over the accumulated batch. Normalisation:
  sequence  sum_i sum_{j masked} CE_ij w(t_i) / L_i / B   (L_i = maskable tokens of row i; REFERENCE's formula)
  token     sum_ij CE_ij w(t_i) / sum_i L_i
  batch     sum_ij CE_ij w(t_i) / B
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .contracts import IGNORE_INDEX, Batch

SCHEDULES = ("linear", "cosine")
NORMALIZATIONS = ("token", "sequence", "batch")
POSITION_KEYS = ("position_ids", "position_ids_alt")
# Streams of the seeded generators, so training masks, eval masks and sampling never share draws.
TRAIN_STREAM, EVAL_STREAM = 1, 2


# --- noise schedules --------------------------------------------------------------------------

def mask_probability(t: np.ndarray, schedule: str) -> np.ndarray:
    """p_mask(t) = 1 - alpha_t: linear t; cosine sin(pi t / 2) (MD4's alpha_t = 1 - cos(pi/2 (1 - t)))."""
    t = np.asarray(t, dtype=np.float64)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return np.sin(0.5 * np.pi * t)
    raise ValueError(f"noise schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def loss_weight(t: np.ndarray, schedule: str) -> np.ndarray:
    """w(t) = -alpha'_t / (1 - alpha_t), the continuous-time ELBO weight: 1/t for the linear schedule,
    (pi/2) cot(pi t / 2) for the cosine one (which tends to 1/t as t -> 0)."""
    t = np.asarray(t, dtype=np.float64)
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return 0.5 * np.pi / np.tan(0.5 * np.pi * t)
    raise ValueError(f"noise schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def sample_t(rng: np.random.Generator, n: int, eps: float) -> np.ndarray:
    """One noise level per sequence, t ~ U(eps, 1)."""
    return eps + (1.0 - eps) * rng.random(n)


# --- positions of appended or revived text ----------------------------------------------------

def next_text_position(position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """[B] the position a token appended after each row's real tokens takes: max over channels + 1."""
    real = attention_mask.astype(bool)[None]
    floor = -np.inf if np.issubdtype(position_ids.dtype, np.floating) else np.iinfo(position_ids.dtype).min
    return np.where(real, position_ids, floor).max(axis=(0, 2)) + 1


def place_text(batch: Batch, columns: np.ndarray) -> None:
    """Give the positions `columns` [B, L] (True = becomes text after the row's real tokens) consecutive
    text positions, in place, in every position set of the batch (Circle-RoPE's alt ids too)."""
    order = np.cumsum(columns, axis=1) - 1  # 0, 1, ... along each row's new columns
    for key in POSITION_KEYS:
        if key not in batch:
            continue
        ids = batch[key]
        start = next_text_position(ids, batch["attention_mask"])
        new = (start[:, None] + order).astype(ids.dtype)
        batch[key] = np.where(columns[None], new[None], ids)


def add_eos_tail(batch: Batch, tail_token_id: int) -> tuple[Batch, np.ndarray]:
    """Turn each row's right padding into trained end tokens; returns (batch, tail [B, L] bool).

    The tail attends and is attended to like any text, at positions that continue the row, so the
    model learns to fill the rest of a canvas with end tokens (variable-length generation).
    """
    attention = batch["attention_mask"].astype(bool)
    if (np.diff(attention.astype(np.int8), axis=1) > 0).any():
        raise ValueError("train_eos_tail needs right-padded batches (padding after each row's tokens)")
    tail = ~attention
    out = dict(batch)
    place_text(out, tail)
    out["input_ids"] = np.where(tail, tail_token_id, batch["input_ids"])
    out["attention_mask"] = np.ones_like(batch["attention_mask"])
    return out, tail


# --- masking ----------------------------------------------------------------------------------

def maskable_positions(batch: Batch, protected_ids: np.ndarray, mask_prompt_loss: bool) -> np.ndarray:
    """[B, L] bool: the response (labels != -100) when `mask_prompt_loss`, else every real text token;
    never a vision token (`protected_ids`: image/video pads, vision start/end)."""
    if mask_prompt_loss:
        maskable = batch["labels"] != IGNORE_INDEX
    else:
        maskable = batch["attention_mask"].astype(bool)
    return maskable & ~np.isin(batch["input_ids"], protected_ids)


def draw_mask(rng: np.random.Generator, maskable: np.ndarray, t: np.ndarray, schedule: str) -> np.ndarray:
    """Each maskable position is masked independently with probability p_mask(t_row)."""
    return (rng.random(maskable.shape) < mask_probability(t, schedule)[:, None]) & maskable


def masked_batch(
    batch: Batch,
    t: np.ndarray,
    masked: np.ndarray,
    maskable: np.ndarray,
    *,
    mask_token_id: int,
    schedule: str,
    normalization: str,
) -> Batch:
    """The masked batch (module docstring) for given noise levels `t` [B] and mask [B, L].

    Deterministic, so tests can fix t and the mask and compare the loss with a direct computation.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"loss normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    if (masked & ~maskable).any():
        raise ValueError("masked positions must be maskable")
    lengths = maskable.sum(axis=1)
    row_factor = 1.0 / np.maximum(lengths, 1) if normalization == "sequence" else np.ones(len(t))
    weights = np.where(masked, (loss_weight(t, schedule) * row_factor)[:, None], 0.0)
    denominator = lengths.sum() if normalization == "token" else len(t)
    out = dict(batch)
    out["input_ids"] = np.where(masked, mask_token_id, batch["input_ids"])
    out["labels"] = np.where(masked, batch["input_ids"], IGNORE_INDEX).astype(np.int64)
    out["loss_weights"] = weights.astype(np.float32)
    out["loss_denominator"] = np.asarray(denominator, dtype=np.int64)
    out["mdlm_t"] = np.asarray(t, dtype=np.float64)
    return out


@dataclass(frozen=True)
class MdlmObjective:
    """Everything a backend needs to train and sample with MDLM: the recipe's settings and the
    model's special token ids (resolved by data.mdlm_tokens from the model directory)."""

    args: Any
    """The recipe's mdlm section (core.config.MdlmArgs; not imported here: config validates recipes
    through the sampler, which builds on this module)."""
    mask_token_id: int
    protected_ids: tuple[int, ...]
    """Token ids never masked: the vision placeholders and their start/end markers."""
    end_token_ids: tuple[int, ...]
    """Where generation stops (the model's eos ids: <|im_end|>, <|endoftext|>)."""
    tail_token_id: int
    """What fills the trained EOS tail (train_eos_tail)."""
    seed: int = 0

    def mask(self, batch: Batch, rng: np.random.Generator) -> Batch:
        """Draw t per row and the mask, and return the masked batch."""
        if "cu_seqlens" in batch:
            raise NotImplementedError("objective mdlm does not support packed batches yet (cu_seqlens)")
        tail = None
        if self.args.train_eos_tail:
            batch, tail = add_eos_tail(batch, self.tail_token_id)
        maskable = maskable_positions(batch, np.asarray(self.protected_ids, dtype=np.int64), self.args.mask_prompt_loss)
        if tail is not None:
            maskable |= tail
        t = sample_t(rng, maskable.shape[0], self.args.mdlm_eps)
        masked = draw_mask(rng, maskable, t, self.args.noise_schedule)
        return masked_batch(
            batch, t, masked, maskable, mask_token_id=self.mask_token_id,
            schedule=self.args.noise_schedule, normalization=self.args.loss_normalization,
        )

    def saved_settings(self) -> dict:
        """What a saved model records in mdlm.json: how it was noised and how to sample it by default."""
        keys = ("noise_schedule", "mdlm_eps", "mask_prompt_loss", "loss_normalization", "train_eos_tail",
                "mdlm_steps", "mdlm_block_length", "mdlm_remasking", "mdlm_temperature")
        return {key: getattr(self.args, key) for key in keys}

    def mask_for_eval(self, batch: Batch) -> Batch:
        """The same batch always gets the same mask (seeded by its content), so eval losses compare."""
        digest = zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes())
        return self.mask(batch, np.random.default_rng([self.seed, EVAL_STREAM, digest]))


class MaskedBatches:
    """Wraps a batch source: every micro-batch comes out masked, from a generator seeded by
    (seed, draw index), so a resumed run draws exactly the masks the original run would have."""

    def __init__(self, batches, objective: MdlmObjective):
        self.batches = batches
        self.objective = objective
        self.draws = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.batches.batches_per_epoch

    @property
    def skipped(self) -> list[str]:
        return self.batches.skipped

    def state_dict(self) -> dict:
        return {**self.batches.state_dict(), "mdlm_draws": self.draws}

    def close(self) -> None:
        self.batches.close()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict({k: v for k, v in state.items() if k != "mdlm_draws"})
        self.draws = int(state.get("mdlm_draws", 0))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng([self.objective.seed, TRAIN_STREAM, self.draws])
        self.draws += 1
        return self.objective.mask(next(self.batches), rng)
