"""The masked-diffusion sampler's control loop, backend-neutral (REFERENCE.md s4).

The prompt is followed by a canvas of N mask tokens, filled block by block (semi-autoregressive
blocks of `block_length`). Each step the backend proposes a token x0 and a confidence for every
position (`Propose`, which keeps the [B, L, V] logits on the device); this loop decides how many
tokens to commit, `round(n_masked * (1 - p_mask(s) / p_mask(t)))` for the step from time t to s,
and which: the most confident masked positions of the current block (or random ones). Committed
tokens are never re-masked. Generation stops once every row has an end token in its finished blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .contracts import Batch
from .mdlm import mask_probability, place_text

REMASKING = ("low_confidence", "random")

Propose = Callable[[Batch, int, float, np.random.Generator], tuple[np.ndarray, np.ndarray]]
"""(canvas batch, keep, temperature, rng) -> (x0 int64 [B, keep], confidence float [B, keep]) for the
last `keep` positions (the canvas; the prompt's logits are never needed, so the LM head skips them).
x0 is the argmax of the (Gumbel-perturbed, when temperature > 0) logits with the mask token excluded;
confidence is the softmax probability of x0 under the unperturbed logits."""


@dataclass(frozen=True)
class SamplerSettings:
    gen_length: int
    """Canvas size N: mask tokens appended after the prompt."""
    block_length: int = 32
    """Positions filled per semi-autoregressive block (capped at gen_length)."""
    steps: int = 0
    """Denoising steps over the whole canvas (0 = gen_length, one token per step)."""
    remasking: str = "low_confidence"
    temperature: float = 0.0
    schedule: str = "linear"

    def resolved(self) -> "SamplerSettings":
        """Defaults filled in and the block/step arithmetic checked, with a fix in the message."""
        if self.gen_length < 1:
            raise ValueError(f"sampler: gen_length {self.gen_length} must be >= 1")
        block = min(self.block_length, self.gen_length)
        steps = self.steps or self.gen_length
        if block < 1 or self.gen_length % block:
            raise ValueError(f"sampler: gen_length {self.gen_length} is not a multiple of block_length {block}")
        blocks = self.gen_length // block
        if steps % blocks:
            raise ValueError(f"sampler: steps {steps} must be a multiple of the number of blocks {blocks} (gen_length / block_length)")
        if self.remasking not in REMASKING:
            raise ValueError(f"sampler: remasking {self.remasking!r} is not one of {', '.join(REMASKING)}")
        if self.temperature < 0:
            raise ValueError(f"sampler: temperature {self.temperature} must be >= 0")
        return replace(self, block_length=block, steps=steps)


def reveal_counts(n_masked: int, steps: int, schedule: str) -> list[int]:
    """Tokens to commit at each of `steps` steps that take a block of `n_masked` masks from t = 1 to 0.

    From time t to s a masked token stays masked with probability p_mask(s) / p_mask(t), so
    round(n * (1 - p_mask(s) / p_mask(t))) of the n still masked are revealed; the last step reveals
    the rest. Linear schedule, steps == n: exactly one per step.
    """
    counts, remaining = [], n_masked
    for k in range(steps):
        t, s = 1.0 - k / steps, 1.0 - (k + 1) / steps
        if k == steps - 1:
            count = remaining
        else:
            keep = float(mask_probability(s, schedule) / mask_probability(t, schedule))
            count = min(remaining, int(np.floor(remaining * (1.0 - keep) + 0.5)))
        counts.append(count)
        remaining -= count
    return counts


def append_canvas(batch: Batch, gen_length: int, mask_token_id: int) -> Batch:
    """The left-padded prompt batch followed by `gen_length` mask tokens at the next text positions."""
    rows = batch["input_ids"].shape[0]
    out = dict(batch)
    out["input_ids"] = np.concatenate([batch["input_ids"], np.full((rows, gen_length), mask_token_id, np.int64)], axis=1)
    out["attention_mask"] = np.concatenate([batch["attention_mask"], np.zeros((rows, gen_length), np.int64)], axis=1)
    for key in ("position_ids", "position_ids_alt"):
        if key in batch:
            pad = np.zeros(batch[key].shape[:2] + (gen_length,), dtype=batch[key].dtype)
            out[key] = np.concatenate([batch[key], pad], axis=2)
    out.pop("rope_deltas", None)
    out.pop("rope_deltas_alt", None)
    new = np.zeros(out["input_ids"].shape, dtype=bool)
    new[:, -gen_length:] = True
    place_text(out, new)
    out["attention_mask"][:, -gen_length:] = 1
    return out


def top_k_positions(score: np.ndarray, k: int) -> np.ndarray:
    """[B, k] column indices of the k highest scores per row (ties: the leftmost first)."""
    return np.argsort(-score, axis=1, kind="stable")[:, :k]


def cut_at_end(ids: list[int], end_token_ids: set[int]) -> list[int]:
    return ids[: next((i for i, t in enumerate(ids) if t in end_token_ids), len(ids))]


def diffusion_generate(
    propose: Propose,
    batch: Batch,
    settings: SamplerSettings,
    *,
    mask_token_id: int,
    end_token_ids: tuple[int, ...],
    rng: np.random.Generator,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> list[list[int]]:
    """Generated ids per prompt row of the left-padded `batch`, each cut at its first end token.

    `on_step(generated)` (optional) sees the generated part [B, N] after every committing step.
    """
    s = settings.resolved()
    canvas = append_canvas(batch, s.gen_length, mask_token_id)
    prompt_length = batch["input_ids"].shape[1]
    generated = canvas["input_ids"][:, prompt_length:]  # a view: committing here commits into the canvas
    rows = np.arange(generated.shape[0])[:, None]
    blocks = s.gen_length // s.block_length
    counts = reveal_counts(s.block_length, s.steps // blocks, s.schedule)
    ends = np.asarray(end_token_ids, dtype=np.int64)
    for block in range(blocks):
        lo, hi = block * s.block_length, (block + 1) * s.block_length
        for count in counts:
            if count == 0:
                continue
            x0, confidence = propose(canvas, s.gen_length, s.temperature, rng)
            candidate = np.zeros_like(generated, dtype=bool)
            candidate[:, lo:hi] = generated[:, lo:hi] == mask_token_id
            score = rng.random(generated.shape) if s.remasking == "random" else confidence.astype(np.float64)
            chosen = top_k_positions(np.where(candidate, score, -np.inf), count)
            generated[rows, chosen] = x0[rows, chosen]
            if on_step is not None:
                on_step(generated.copy())
        if np.isin(generated[:, :hi], ends).any(axis=1).all():
            break  # every row has finished; the remaining blocks would be cut away
    end_set = set(int(e) for e in ends)
    return [cut_at_end(row, end_set) for row in generated.tolist()]
