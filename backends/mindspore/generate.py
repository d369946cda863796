"""Generation with a MindSpore Qwen VL model from a numpy batch: greedy or sampled, with a KV cache,
optionally streamed (mirrors backends/torch/generate.py).

The prompt (text and vision) is prefilled once into a `KVCache`; each later step feeds one token per
row. Positions are vltune's own throughout: each new token sits at its row's next text position (max
over its real tokens and channels, + 1, then + 1 per step) in `position_ids` and, with Circle-RoPE AGE,
in `position_ids_alt` -- which is also what transformers' generate() gives for plain M-RoPE (its
rope_deltas), so both backends decode alike. `use_cache=False` re-runs the whole sequence every step
(the reference the cache is tested against).

Logits processing runs on the host in numpy, in transformers' order and with its arithmetic
(repetition penalty, temperature, top-k, top-p), so greedy decoding -- repetition penalty and top_k=1
included -- picks the tokens the torch backend picks from the same logits. Sampling draws from a numpy
generator seeded with `settings.seed`: reproducible on this backend, not the torch backend's stream.
"""

from __future__ import annotations

from collections.abc import Callable

import json
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn

from vltune.core.contracts import Batch
from vltune.core.generation import GenerationSettings, TextStream
from vltune.data.model_info import ModelInfo

from .attention import TextAttentionLayout
from .models import ModelInputs


def end_token_ids(model_dir: str | Path, cfg) -> set[int]:
    """generation_config.json's eos_token_id (int or list), else the text config's."""
    path = Path(model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    if eos is None:
        text = cfg.raw.get("text_config") or cfg.raw
        eos = text.get("eos_token_id")
    if eos is None:
        raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or config.json")
    return set(eos if isinstance(eos, list) else [eos])


def next_positions(position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """[B] each row's next text position: max over its real tokens and the three channels, + 1."""
    pos = np.asarray(position_ids, dtype=np.float64)
    masked = np.where(attention_mask[None].astype(bool), pos, -np.inf)
    return masked.max(axis=(0, 2)) + 1


# -- logits processing (transformers' processors, in generate()'s order) ---------------------------


def process_logits(scores: np.ndarray, seen: list[np.ndarray], settings: GenerationSettings) -> np.ndarray:
    """scores [B, V] fp32 -> the scores generate() would sample (or take the argmax) from.

    `seen[b]`: the ids already in row b (its real prompt tokens and what was generated), which the
    repetition penalty lowers: score * p where negative, score / p otherwise (each id once).
    """
    scores = np.array(scores, dtype=np.float32)
    penalty = settings.repetition_penalty
    if penalty not in (None, 1.0):
        p = np.float32(penalty)
        for row, ids in enumerate(seen):
            ids = np.unique(ids[ids < scores.shape[1]])
            picked = scores[row, ids]
            scores[row, ids] = np.where(picked < 0, picked * p, picked / p)
    if not settings.do_sample:
        return scores
    if settings.temperature not in (None, 1.0):
        scores = scores / np.float32(settings.temperature)
    if settings.top_k:
        k = min(settings.top_k, scores.shape[1])
        kth = np.sort(scores, axis=1)[:, -k][:, None]
        scores = np.where(scores < kth, -np.inf, scores).astype(np.float32)
    if settings.top_p is not None and settings.top_p < 1.0:
        order = np.argsort(scores, axis=1, kind="stable")  # ascending, as torch.sort(descending=False)
        ordered = np.take_along_axis(scores, order, axis=1).astype(np.float64)
        probs = np.exp(ordered - ordered.max(axis=1, keepdims=True))
        cumulative = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
        remove_sorted = cumulative <= 1 - settings.top_p
        remove_sorted[:, -1] = False  # keep at least one token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=1)
        scores = np.where(remove, -np.inf, scores).astype(np.float32)
    return scores


def choose_tokens(scores: np.ndarray, settings: GenerationSettings, rng: np.random.Generator | None) -> np.ndarray:
    """[B] the next ids: the argmax (first on ties, as torch), or a draw from softmax(scores) with `rng`."""
    if rng is None or not settings.do_sample:
        return scores.argmax(axis=1).astype(np.int64)
    logits = scores.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    draws = rng.random(len(probs))
    return np.array([min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1) for p, u in zip(probs, draws)])


# -- decoding ------------------------------------------------------------------------------------


def _step_inputs(tokens: np.ndarray, positions: np.ndarray, alt: np.ndarray | None, attention: np.ndarray, past: int) -> ModelInputs:
    """One decoding step: `tokens` [B] at `positions` [3, B, 1] after `past` cached tokens (no media)."""
    layout = TextAttentionLayout(len(tokens), 1, causal=True, padding=attention, past_length=past)
    return ModelInputs(input_ids=Tensor(tokens[:, None].astype(np.int32)), position_ids=positions, layout=layout, position_ids_alt=alt)


def generate(
    model: nn.Cell,
    batch: Batch,
    eos: set[int],
    settings: GenerationSettings = GenerationSettings(),
    *,
    streamer: TextStream | None = None,
    use_cache: bool = True,
    causal: bool = True,
) -> list[list[int]]:
    """Continuation ids of each left-padded prompt row, cut at the first end token.

    `streamer` (one row only, as transformers' generate() allows) gets the prompt, then each token.
    `causal=False` (bidirectional attention) cannot reuse cached keys and re-runs the sequence.
    """
    model.set_train(False)
    ids = np.asarray(batch["input_ids"])
    attention = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    positions = np.asarray(batch["position_ids"])
    alt = np.asarray(batch["position_ids_alt"]) if "position_ids_alt" in batch else None
    if streamer is not None and ids.shape[0] != 1:
        raise ValueError(f"streaming needs a batch of one prompt, got {ids.shape[0]}")
    next_pos = next_positions(positions, attention)
    next_alt = next_positions(alt, attention) if alt is not None else None
    eos_list = sorted(eos)
    rng = np.random.default_rng(settings.seed) if settings.do_sample else None
    use_cache = use_cache and causal
    cache = model.new_cache() if use_cache else None
    seen = [row[mask.astype(bool)] for row, mask in zip(ids, attention)]  # left padding is not "already generated"
    if streamer is not None:
        streamer.put(ids)

    finished = np.zeros(ids.shape[0], dtype=bool)
    generated: list[np.ndarray] = []
    inputs = ModelInputs.from_batch(batch, model.cfg, causal=causal)
    step_batch = dict(batch)
    for step in range(settings.max_new_tokens):
        logits = model(inputs, logits_to_keep=1, cache=cache)[:, -1].asnumpy()
        scores = process_logits(logits, seen, settings)
        token = choose_tokens(scores, settings, rng)
        token = np.where(finished, eos_list[0], token)
        generated.append(token)
        seen = [np.append(s, t) for s, t in zip(seen, token)]
        if streamer is not None:
            streamer.put(token)
        finished |= np.isin(token, eos_list)
        if finished.all():
            break
        attention = np.concatenate([attention, np.ones_like(attention[:, :1])], axis=1)
        new = {}
        for key, start, old in (("position_ids", next_pos, positions), ("position_ids_alt", next_alt, alt)):
            if start is not None:
                new[key] = np.broadcast_to((start + step).astype(old.dtype)[None, :, None], (3, len(token), 1))
        if use_cache:
            inputs = _step_inputs(token, new["position_ids"], new.get("position_ids_alt"), attention, cache.length)
        else:
            step_batch["input_ids"] = np.concatenate([step_batch["input_ids"], token[:, None]], axis=1)
            step_batch["attention_mask"] = attention
            for key, value in new.items():
                step_batch[key] = np.concatenate([step_batch[key], value], axis=2)
            inputs = ModelInputs.from_batch(step_batch, model.cfg, causal=causal)

    if streamer is not None:
        streamer.end()
    rows = np.stack(generated, axis=1).tolist() if generated else [[] for _ in range(ids.shape[0])]
    return [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def generate_greedy(model: nn.Cell, batch: Batch, max_new_tokens: int, eos: set[int], causal: bool = True) -> list[list[int]]:
    """Greedy continuation of each prompt row (the trainer's evaluation decodes with this)."""
    return generate(model, batch, eos, GenerationSettings(max_new_tokens=max_new_tokens), causal=causal)


class InferenceEngine:
    """What `vltune infer` drives (inference.py, through backends.engine): the native model (PyNative, fp32 on CPU / the Ascend kernels on NPUs), its
    KV-cached decoding loop, Circle-RoPE AGE layers set from circle_rope.json. A LoRA adapter is merged
    into the base weights at load time (no peft on this backend). Imports no torch."""

    def __init__(self, model_dir: str | Path, adapter: str | Path | None, circle_rope: dict | None):
        import mindspore as ms

        from .lora import merge_lora_adapter
        from .models import load_model

        ms.set_context(mode=ms.PYNATIVE_MODE)  # the models read host-side numpy per batch (as training.py sets)
        self.model = load_model(model_dir)
        if adapter is not None:
            merge_lora_adapter(self.model, adapter)
        if circle_rope:
            self.model.model.language_model.set_age_mode(circle_rope.get("AGE_mode", "strategy_1"))
        self.eos = end_token_ids(model_dir, self.model.cfg)

    def text_stream(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        return TextStream(decode, write)

    def generate(self, batch: Batch, info: ModelInfo, settings: GenerationSettings, streamer) -> list[int]:
        (out,) = generate(self.model, batch, self.eos, settings, streamer=streamer)
        return out

    def diffusion(self, batch: Batch, settings, mask_token_id: int, end_token_ids: tuple[int, ...], seed: int) -> list[int]:
        """The masked-diffusion sampler (core's loop) on the native model's bidirectional forward."""
        from vltune.core.mdlm_sampler import diffusion_generate

        from .mdlm import make_propose

        (ids,) = diffusion_generate(
            make_propose(self.model, mask_token_id), batch, settings, mask_token_id=mask_token_id,
            end_token_ids=end_token_ids, rng=np.random.default_rng(seed),
        )
        return ids
