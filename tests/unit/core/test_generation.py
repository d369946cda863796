"""Decoding settings and the think-block split (core/generation.py): pure Python, engine-neutral."""

from __future__ import annotations

import pytest

from vltune.core.config import ConfigError
from vltune.core.generation import GenerationSettings, opens_thinking, sample_seed, split_thinking

START, END = 7, 8


def test_greedy_is_the_default_and_sampling_needs_a_positive_temperature_or_a_filter():
    assert not GenerationSettings().do_sample
    assert not GenerationSettings(temperature=0).do_sample
    assert not GenerationSettings(temperature=0, top_p=0.9).do_sample  # 0 means greedy, whatever else is set
    assert GenerationSettings(temperature=0.7).do_sample
    assert GenerationSettings(top_p=0.9).do_sample and GenerationSettings(top_k=5).do_sample
    assert not GenerationSettings(repetition_penalty=1.2).do_sample  # applies to greedy decoding too


def test_validation_names_every_bad_flag_at_once():
    with pytest.raises(ConfigError) as e:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=1.5, top_k=0, repetition_penalty=0).validate()
    for flag in ("--max-new-tokens 0", "--temperature -1", "--top-p 1.5", "--top-k 0", "--repetition-penalty 0"):
        assert flag in str(e.value)
    settings = GenerationSettings(temperature=0.5, top_p=1.0, top_k=1)
    assert settings.validate() is settings


def test_sample_seed_depends_on_the_sample_not_on_run_order():
    assert sample_seed(0, "a") == sample_seed(0, "a")
    assert len({sample_seed(0, "a"), sample_seed(0, "b"), sample_seed(1, "a")}) == 3
    assert 0 <= sample_seed(123, "x") < 2**31


def test_opens_thinking_looks_at_the_last_marker():
    assert opens_thinking([1, START, 2], START, END)
    assert not opens_thinking([1, START, 2, END, 3], START, END)
    assert opens_thinking([START, END, START], START, END)
    assert not opens_thinking([1, 2], START, END)


def test_split_thinking():
    # The prompt opened the block (Qwen3-VL Thinking): reasoning up to </think>, then the answer.
    split = split_thinking([1, 2, END, 3, 4], True, START, END)
    assert (split.thinking, split.answer, split.closed) == ([1, 2], [3, 4], True)
    # The model opened it itself.
    split = split_thinking([START, 1, END, 3], False, START, END)
    assert (split.thinking, split.answer, split.closed) == ([1], [3], True)
    # No block: all answer. An open block that never closed: all reasoning, no answer.
    assert split_thinking([1, 2], False, START, END).thinking is None
    split = split_thinking([1, 2], True, START, END)
    assert (split.thinking, split.answer, split.closed) == ([1, 2], [], False)
