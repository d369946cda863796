"""The MindSpore decoding loop (backends/mindspore/generate.py): the KV cache changes nothing but speed,
the logits processors are transformers', and streaming writes exactly the decoded generation."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from vltune.backends.mindspore.attention import TextAttentionLayout  # noqa: E402
from vltune.backends.mindspore.generate import TextStream, choose_tokens, end_token_ids, generate, process_logits  # noqa: E402
from vltune.backends.mindspore.models import load_model  # noqa: E402
from vltune.core.generation import GenerationSettings  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402
from vltune.data.synthetic_corpus import write_format_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus_samples(tmp_path_factory):
    """One image sample, one video sample and one text-only sample of the format corpus."""
    files = write_format_corpus(tmp_path_factory.mktemp("ms_gen_corpus"), num_samples=17, seed=0)
    first = {}
    for s in (s for f in files for s in load_samples(f)):
        first.setdefault(s.id.split("-")[0], s)
    return [first["single"], first["video"], first["text"]]


def _prompt_batch(model_dir, samples, circle_rope=None):
    """The samples as a left-padded prompt batch (their last answer turn is the slot generation fills)."""
    dataset = SFTDataset(samples, model_dir, max_length=4096, max_pixels=12544, min_pixels=3136)
    features = [dataset.prompt(i)[0] for i in range(len(samples))]
    return Collator(dataset.info, dataset.tokenizer.pad_token_id, circle_rope)(features, padding_side="left")


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "ovis2_5"])
def test_cached_generation_equals_uncached_token_for_token(tiny_models, corpus_samples, model_type):
    """A left-padded batch of an image, a video and a text prompt (DeepStack on Qwen3-VL, indicator
    embeddings on Ovis2.5): the KV-cached loop gives the ids of re-running the whole sequence every step."""
    model_dir = tiny_models[model_type]
    model = load_model(model_dir)
    batch = _prompt_batch(model_dir, corpus_samples)
    assert batch["attention_mask"].min() == 0  # rows of different lengths: left padding is exercised
    eos = end_token_ids(model_dir, model.cfg)
    settings = GenerationSettings(max_new_tokens=6)
    cached = generate(model, batch, eos, settings)
    uncached = generate(model, batch, eos, settings, use_cache=False)
    assert cached == uncached, (cached, uncached)
    assert all(len(row) == 6 for row in cached)  # the random model never ends: 6 steps compared per row
    assert len({tuple(row) for row in cached}) == 3  # the prompts lead to different continuations


def test_top_k_1_decodes_greedily_and_seeded_sampling_repeats_itself(tiny_model_dirs, corpus_samples):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    model = load_model(model_dir)
    batch = _prompt_batch(model_dir, corpus_samples[2:])  # text only: the loop, not the vision tower, is under test
    eos = end_token_ids(model_dir, model.cfg)
    greedy = generate(model, batch, eos, GenerationSettings(max_new_tokens=8))
    assert generate(model, batch, eos, GenerationSettings(max_new_tokens=8, temperature=0.7, top_k=1, seed=4)) == greedy
    hot = GenerationSettings(max_new_tokens=8, temperature=2.0, seed=4)
    sampled = generate(model, batch, eos, hot)
    assert generate(model, batch, eos, hot) == sampled != greedy


def test_the_cache_extends_positions_and_masks_as_a_full_forward_would(tiny_model_dirs, corpus_samples):
    """Prefill, then two single-token steps through the cache: each step's logits equal the full
    forward's at that position (Circle-RoPE float ids and AGE alt ids continued independently)."""
    from vltune.backends.mindspore.generate import _step_inputs, next_positions
    from vltune.backends.mindspore.models import ModelInputs
    from vltune.core.circle_rope import age_layer_mask
    from vltune.core.config import CIRCLE_ROPE_DEFAULTS

    model_dir = tiny_model_dirs["qwen2_5_vl"]
    model = load_model(model_dir)
    circle = {**CIRCLE_ROPE_DEFAULTS, "AGE_mode": "strategy_4"}
    model.model.language_model.set_alt_layers(age_layer_mask("strategy_4", model.cfg.text.num_hidden_layers))
    batch = _prompt_batch(model_dir, corpus_samples[:1] + corpus_samples[2:], circle_rope=circle)
    assert np.issubdtype(batch["position_ids"].dtype, np.floating) and "position_ids_alt" in batch
    tokens = np.array([[17, 40], [23, 5]])
    full = dict(batch, input_ids=np.concatenate([batch["input_ids"], tokens], axis=1),
                attention_mask=np.concatenate([batch["attention_mask"], np.ones_like(tokens)], axis=1))
    for key in ("position_ids", "position_ids_alt"):
        start = next_positions(batch[key], batch["attention_mask"])
        extra = np.stack([start, start + 1], axis=1).astype(batch[key].dtype)
        full[key] = np.concatenate([batch[key], np.broadcast_to(extra[None], (3, *extra.shape))], axis=2)
    want = model(ModelInputs.from_batch(full, model.cfg)).asnumpy()[:, -2:]

    cache = model.new_cache()
    model(ModelInputs.from_batch(batch, model.cfg), logits_to_keep=1, cache=cache)
    length = batch["input_ids"].shape[1]
    for step in range(2):
        pos = full["position_ids"][:, :, length + step : length + step + 1]
        alt = full["position_ids_alt"][:, :, length + step : length + step + 1]
        attention = full["attention_mask"][:, : length + step + 1]
        got = model(_step_inputs(tokens[:, step], pos, alt, attention, cache.length), cache=cache).asnumpy()[:, 0]
        np.testing.assert_allclose(got, want[:, step], rtol=0, atol=1e-4 * np.abs(want).max())
    assert cache.length == length + 2


def test_layout_with_past_keys_masks_padding_and_future():
    layout = TextAttentionLayout(2, 2, padding=np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), past_length=3)
    ok = layout.allowed()
    assert ok.shape == (2, 2, 5)
    assert ok[0, 0].tolist() == [False, True, True, True, False]  # padding and the next token masked
    assert ok[1, 1].tolist() == [True] * 5
    with pytest.raises(ValueError, match="packed"):
        TextAttentionLayout(1, 1, cu_seqlens=np.array([0, 1]), past_length=2)
    with pytest.raises(ValueError, match=r"past \+ L"):
        TextAttentionLayout(1, 1, padding=np.ones((1, 1)), past_length=2)


def test_logits_processors_match_transformers():
    """process_logits against transformers' own processors on the same fp32 scores: repetition
    penalty (bit-identical), temperature, top-k (ties kept), top-p (the same tokens survive)."""
    torch = pytest.importorskip("torch")
    from vltune.backends.torch.generate import logits_processors

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 97)).astype(np.float32) * 3
    scores[1, 10] = scores[1, 11] = scores[1].max() + 1  # a tie at the top
    prompt = rng.integers(0, 97, size=(3, 12))
    mask = np.ones_like(prompt)
    mask[2, :4] = 0  # a left-padded row: its padding is not penalised
    seen = [row[m.astype(bool)] for row, m in zip(prompt, mask)]
    for settings in (
        GenerationSettings(repetition_penalty=1.3),
        GenerationSettings(temperature=0.7, top_k=5, repetition_penalty=0.8),
        GenerationSettings(temperature=1.3, top_p=0.6),
        GenerationSettings(top_k=1),
        GenerationSettings(temperature=0.5, top_k=3, top_p=0.9),
    ):
        processors = logits_processors(settings, torch.as_tensor(mask))
        want = processors(torch.as_tensor(prompt), torch.as_tensor(scores)).numpy()
        got = process_logits(scores, seen, settings)
        assert np.array_equal(np.isinf(got), np.isinf(want)), settings
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6, atol=0)
        if settings.repetition_penalty and not settings.do_sample:
            assert np.array_equal(got, want)


def test_top_k_one_is_greedy_and_sampling_is_seeded():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 50)).astype(np.float32)
    seen = [np.array([], dtype=np.int64)] * 4
    top1 = GenerationSettings(temperature=0.7, top_k=1)
    picks = choose_tokens(process_logits(scores, seen, top1), top1, np.random.default_rng(5))
    assert picks.tolist() == scores.argmax(1).tolist()
    sampled = GenerationSettings(temperature=2.0)
    draw = lambda seed: choose_tokens(process_logits(scores, seen, sampled), sampled, np.random.default_rng(seed)).tolist()  # noqa: E731
    assert draw(3) == draw(3)
    assert len({tuple(draw(s)) for s in range(8)}) > 1


def test_text_stream_writes_whole_characters_and_exactly_the_decoded_text(tiny_qwen2_5_vl):
    from vltune.data.chat import ChatTokenizer

    tok = ChatTokenizer(tiny_qwen2_5_vl)
    text = "A smile 🙂, an é\nsecond line ✓ done"
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    pieces: list[str] = []
    stream = TextStream(tok.decode, pieces.append)
    stream.put(np.array([[1, 2, 3]]))  # the prompt comes first and is not shown
    for i in ids:
        stream.put(np.array([i]))
    stream.end()
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 10


def test_cached_decoding_on_the_ascend_kernels_equals_the_cpu_path(tiny_model_dirs, monkeypatch):
    """flash_attention_score (BNSD) with one query against past + 1 keys and a [B, 1, 1, past + 1] mask,
    through the stand-in of tests/unit/backends/test_ms_dispatch.py: the CPU path's ids."""
    from test_ms_dispatch import FakeAscend, _ascend_model, _text_batch
    from mindspore import ops

    fake = FakeAscend()
    monkeypatch.setattr(ops, "flash_attention_score", fake.flash_attention_score, raising=False)
    monkeypatch.setattr(ops, "rms_norm", fake.rms_norm, raising=False)
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    batch = _text_batch(np.random.default_rng(2), 0, [9, 5])
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, ::-1].copy(), batch["attention_mask"][:, ::-1].copy()
    batch["position_ids"] = batch["position_ids"][:, :, ::-1].copy()
    batch["position_ids"][:, 1] = np.concatenate([[0] * 4, np.arange(5)])  # left padding, ids 0..n-1 of real tokens
    batch["position_ids"][:, 0] = np.arange(9)
    eos = end_token_ids(model_dir, load_model(model_dir).cfg)
    settings = GenerationSettings(max_new_tokens=5)
    want = generate(load_model(model_dir), batch, eos, settings)
    got = generate(_ascend_model(model_dir), batch, eos, settings)
    assert got == want and all(len(row) == 5 for row in want)
    assert {c["layout"] for c in fake.calls if "layout" in c} == {"BNSD"}
