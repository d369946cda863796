"""Decoding settings and thinking-mode bookkeeping that every engine shares (pure Python).

The engines differ in how they run a forward pass, not in what "top_p 0.9" or "a thinking budget of
512 tokens" means; so the settings, their validation and the split of a generation into reasoning
and answer live here, once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

from .config import ConfigError

THINKING_CLOSE = (
    "\n\nConsidering the limited time, I have to give the solution based on the thinking directly now.\n</think>\n\n"
)
"""Inserted when the thinking budget runs out (Ovis2.5's two-phase scheme): the model reads that its
reasoning is over and that it must answer now, then generation continues after `</think>`."""

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick each new token. The defaults are plain greedy decoding.

    Every knob is explicit: nothing is inherited from the model's generation_config.json (released
    Qwen checkpoints ship sampling values there, e.g. top_k 1 and repetition_penalty 1.05, which would
    silently turn `--temperature 0.7` back into greedy, or change the trainer's eval answers).
    """

    max_new_tokens: int = 64
    """Upper bound on generated tokens; in thinking mode it bounds reasoning and answer together."""
    temperature: float | None = None
    """> 0 samples at that temperature; None or 0 decodes greedily."""
    top_p: float | None = None
    """Nucleus sampling mass in (0, 1]; setting it (or top_k) without a temperature samples at 1.0."""
    top_k: int | None = None
    """Sample among the k most likely tokens (k >= 1)."""
    repetition_penalty: float | None = None
    """CTRL's penalty (> 0; 1 = off) on every token already in the sequence, prompt included; greedy too."""
    seed: int = 0
    """Seed of the sampler; batch mode derives one per sample from it and the sample id."""

    @property
    def do_sample(self) -> bool:
        if self.temperature is not None:
            return self.temperature > 0
        return self.top_p is not None or self.top_k is not None

    def validate(self) -> "GenerationSettings":
        """Self, or one ConfigError naming every bad value and its flag."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.temperature is not None and self.temperature < 0:
            problems.append(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k {self.top_k}: must be >= 1")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 = off)")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed that does not depend on the order samples are run in, so a resumed batch run
    samples each remaining sample exactly as an uninterrupted run would have."""
    return zlib.crc32(f"{seed}:{sample_id}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class ThinkingSplit:
    """Generated token ids split at the think block (ids of the markers themselves excluded)."""

    thinking: list[int] | None
    """The reasoning, or None when no think block was open (the model answered directly)."""
    answer: list[int]
    closed: bool
    """`</think>` was generated (False: the reasoning ran until generation stopped)."""


def opens_thinking(prompt_ids: list[int], start_id: int, end_id: int) -> bool:
    """The prompt ends inside a think block (Qwen3-VL Thinking's template opens `<think>` itself)."""
    starts = [i for i, t in enumerate(prompt_ids) if t == start_id]
    ends = [i for i, t in enumerate(prompt_ids) if t == end_id]
    return bool(starts) and (not ends or starts[-1] > ends[-1])


def split_thinking(generated: list[int], prompt_open: bool, start_id: int, end_id: int) -> ThinkingSplit:
    """Reasoning and answer of one generation.

    A think block is open when the prompt opened it or the generation starts with `<think>`; it ends
    at the first `</think>`. Without an open block everything is the answer.
    """
    ids = list(generated)
    if not prompt_open:
        if not ids or ids[0] != start_id:
            return ThinkingSplit(None, ids, closed=False)
        ids = ids[1:]
    if end_id in ids:
        cut = ids.index(end_id)
        return ThinkingSplit(ids[:cut], ids[cut + 1 :], closed=True)
    return ThinkingSplit(ids, [], closed=False)


class TextStream:
    """Writes the text of each generated token as soon as it is whole, for both backends (transformers'
    streamer protocol: put() the prompt, which is skipped, then each token; end()).

    The text is decoded from the tokens since the last newline: a character split over several
    byte-level tokens is written once complete, and a long answer does not cost a full decode per
    token. `text` holds everything written so far.
    """

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode = decode
        self.write = write
        self.text = ""
        self._pending: list[int] = []
        self._shown = 0
        self._skip_prompt = True

    def put(self, value) -> None:
        if self._skip_prompt:
            self._skip_prompt = False
            return
        self.add(value.reshape(-1).tolist())  # a torch tensor (any device) or a numpy array

    def add(self, ids: list[int]) -> None:
        """Tokens that did not come through generate() (thinking mode's closing phrase)."""
        self._pending += ids
        text = self.decode(self._pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return
        self._emit(text[self._shown :])
        self._shown = len(text)
        if text.endswith("\n"):
            self._pending, self._shown = [], 0

    def end(self) -> None:
        if self._pending:
            self._emit(self.decode(self._pending)[self._shown :])
        self._pending, self._shown = [], 0
        self._skip_prompt = True  # the next generate() call starts with its prompt again

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self.write(piece)
