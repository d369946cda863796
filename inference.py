"""`vltune infer`: prompts (with images or videos) through a trained or tiny model directory.

`Predictor` holds one loaded model and answers samples one at a time (autoregressive decoding,
greedy or sampled, optionally streamed, with thinking mode and its token budget); the one-prompt
command and batch mode (inference_batch.py) both go through it. The model is either engine's
(`backend` torch or mindspore / ms): everything but loading and the decoding loop is shared. `infer` is the Python API of the
one-prompt command for both objectives (ar, mdlm); `vltune.load(...).chat(...)` (chat.py) keeps one
Predictor's model loaded across prompts.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vltune.core.config import ConfigError
from vltune.core.generation import (
    THINK_END,
    THINK_START,
    THINKING_CLOSE,
    GenerationSettings,
    opens_thinking,
    split_thinking,
)
from vltune.data.collate import Collator
from vltune.data.dataset import Features, SFTDataset
from vltune.data.formats import Sample

# circle_rope.json, as both backends' checkpoint.py name it (imported from neither: loading one
# backend must not import the other).
CIRCLE_ROPE_FILE = "circle_rope.json"

# Keys of the training recipe (saved as recipe.json beside the trained model) that shape the vision
# input; inference reuses them so the model sees images and videos as it did in training.
_PIXEL_KEYS = ("min_pixels", "max_pixels")
_VIDEO_KEYS = ("video_min_pixels", "video_max_pixels", "base_interval", "video_min_frames", "video_max_frames")


def build_prompt_sample(prompt: str, images: list[str], videos: list[str] = (), source: str = "command line") -> Sample:
    """A one-turn user message with the images, then the videos, first, as the Qwen examples place them;
    `source` names where the prompt came from in error messages."""
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos] + [{"type": "text", "text": prompt}]
    # The empty answer turn is dropped by SFTDataset.prompt(); it only marks where generation starts.
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    return Sample(
        id="prompt", messages=messages, images=[Path(p) for p in images], videos=[Path(p) for p in videos],
        source=source,
    )


@dataclass(frozen=True)
class Answer:
    """One generation, split for the caller: the answer, and the reasoning when a think block was open."""

    prediction: str
    """The answer: everything generated, or the text after `</think>` when the model reasoned first."""
    thinking: str | None = None
    """The reasoning inside the think block (None: no block was open)."""
    text: str = ""
    """Everything generated, as streamed: think block, closing phrase if inserted, answer."""
    thinking_cut: bool = False
    """The thinking budget ran out: THINKING_CLOSE was inserted and the answer generated after it."""
    generated_tokens: int = 0
    """Tokens the model generated (the inserted closing phrase not counted)."""

    def __str__(self) -> str:
        return self.prediction


def _check_model_dir(model_dir: str | Path, adapter: str | Path | None) -> None:
    """Before anything loads (vltune infer, batch inference, Predictor, vltune.load): the directories
    exist, and `model_dir` is an HF-format model, not a LoRA adapter given in its place."""
    for what, path in (("model_dir", model_dir), ("adapter", adapter)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{what}: {str(path)!r} is not a directory")
    if adapter is None and (Path(model_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{model_dir} holds a LoRA adapter, not a model: use --model BASE_MODEL_DIR --adapter {model_dir} "
            f"(in Python: vltune.load(BASE_MODEL_DIR, adapter={str(model_dir)!r}); or vltune merge-lora to make a full model)"
        )
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"model_dir: {str(model_dir)!r} has no config.json: give an HF-format model directory "
            "(a training run's output_dir, or one of its checkpoint-STEP folders)"
        )


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _training_recipe(model_dir: str | Path, adapter: str | Path | None) -> dict:
    """The recipe.json a training run saved beside its output (the adapter's first), else {}."""
    for directory in (adapter, model_dir):
        if directory is not None and (Path(directory) / "recipe.json").exists():
            return json.loads((Path(directory) / "recipe.json").read_text())
    return {}


class Predictor:
    """One model, loaded once, answering samples one at a time with autoregressive decoding.

    `thinking`: render prompts with `enable_thinking=True`. `thinking_budget` N: when `</think>` has not
    appeared after N generated tokens, append THINKING_CLOSE and generate the answer after it (the
    two-phase scheme of Ovis2.5); `settings.max_new_tokens` bounds reasoning and answer together.
    Pixel limits default to the recipe.json a training run saved beside the model.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        adapter: str | Path | None = None,
        backend: str = "torch",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        settings: GenerationSettings = GenerationSettings(),
        thinking: bool = False,
        thinking_budget: int | None = None,
    ):
        backend = backend_name(backend)
        self._set_options(settings, thinking, thinking_budget)
        self.model_dir = Path(model_dir)
        _check_model_dir(model_dir, adapter)
        recipe = _training_recipe(model_dir, adapter)
        self.min_pixels = min_pixels if min_pixels is not None else recipe.get("min_pixels")
        self.max_pixels = max_pixels if max_pixels is not None else recipe.get("max_pixels")
        self.video_overrides = {k: recipe.get(k) for k in _VIDEO_KEYS}

        # A model trained with Circle-RoPE carries its settings beside the stock config.json.
        self.circle_rope = _read_json(Path(adapter or model_dir) / CIRCLE_ROPE_FILE)
        self.backend = backend
        self.engine = _inference_engine(backend, model_dir, adapter, self.circle_rope)
        self.model = self.engine.model
        """The loaded model: a transformers model (torch) or the native MindSpore one."""

    def _set_options(self, settings: GenerationSettings, thinking: bool, thinking_budget: int | None) -> None:
        if thinking_budget is not None and thinking_budget < 1:
            raise ConfigError(f"--thinking-budget {thinking_budget}: must be >= 1")
        self.settings = settings.validate()
        self.thinking = thinking
        self.thinking_budget = thinking_budget

    def with_options(self, settings: GenerationSettings, thinking: bool, thinking_budget: int | None) -> "Predictor":
        """A predictor that shares this one's loaded model but decodes with other options (validated alike)."""
        other = copy.copy(self)
        other._set_options(settings, thinking, thinking_budget)
        return other

    def dataset(self, samples: list[Sample]) -> SFTDataset:
        """The samples as prompts for this model (each sample's last turn is the answer slot, dropped)."""
        dataset = SFTDataset(
            samples, self.model_dir, max_length=1 << 30, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
            video_overrides=self.video_overrides, template_kwargs={"enable_thinking": self.thinking},
        )
        return dataset

    def answer(self, dataset: SFTDataset, index: int, *, stream: Callable[[str], None] | None = None, seed: int | None = None) -> Answer:
        """The model's answer to sample `index` of `dataset` (from `self.dataset`); `stream` gets the text
        piece by piece as it is generated; `seed` replaces the settings' sampling seed."""
        settings = self.settings if seed is None else replace(self.settings, seed=seed)
        tok = dataset.tokenizer
        features, _ = dataset.prompt(index)
        prompt = features.input_ids.tolist()
        marks = tok.tokenizer.token_to_id(THINK_START), tok.tokenizer.token_to_id(THINK_END)
        has_marks = None not in marks
        if self.thinking_budget is not None and not has_marks:
            raise ConfigError(f"--thinking-budget: the tokenizer of {self.model_dir} has no {THINK_START}/{THINK_END} tokens")
        prompt_open = has_marks and opens_thinking(prompt, *marks)
        streamer = self.engine.text_stream(tok.decode, stream) if stream is not None else None

        limit = settings.max_new_tokens
        first_limit = min(self.thinking_budget, limit) if self.thinking_budget else limit
        ids = self._generate(dataset, features, prompt, replace(settings, max_new_tokens=first_limit), streamer)
        if self.thinking_budget and len(ids) == first_limit < limit:  # stopped by the budget, tokens left
            rest = replace(settings, max_new_tokens=limit - len(ids), seed=settings.seed + 1)
            if (prompt_open or ids[:1] == [marks[0]]) and marks[1] not in ids:
                return self._answer_after_cut(dataset, features, prompt, ids, rest, prompt_open, streamer)
            ids = ids + self._generate(dataset, features, prompt + ids, rest, streamer)
        split = split_thinking(ids, prompt_open, *marks) if has_marks else None
        if split is None or split.thinking is None:
            return Answer(prediction=tok.decode(ids), text=tok.decode(ids), generated_tokens=len(ids))
        return Answer(
            prediction=tok.decode(split.answer).strip(), thinking=tok.decode(split.thinking).strip(),
            text=tok.decode(ids), generated_tokens=len(ids),
        )

    def _answer_after_cut(
        self, dataset: SFTDataset, features: Features, prompt: list[int], reasoning: list[int],
        settings: GenerationSettings, prompt_open: bool, streamer,
    ) -> Answer:
        """Close the unfinished `reasoning` with THINKING_CLOSE and generate the answer after it."""
        tok = dataset.tokenizer
        close = tok.tokenizer.encode(THINKING_CLOSE, add_special_tokens=False).ids
        if streamer is not None:
            streamer.add(close)
        answer = self._generate(dataset, features, prompt + reasoning + close, settings, streamer)
        thinking = reasoning if prompt_open else reasoning[1:]  # without a `<think>` the model wrote itself
        return Answer(
            prediction=tok.decode(answer).strip(), thinking=tok.decode(thinking).strip(),
            text=tok.decode(reasoning + close + answer), thinking_cut=True, generated_tokens=len(reasoning) + len(answer),
        )

    def _generate(self, dataset: SFTDataset, features: Features, input_ids: list[int], settings: GenerationSettings, streamer) -> list[int]:
        """Continuation of `input_ids` (the prompt, possibly extended by a first phase) with the sample's media."""
        ids = np.asarray(input_ids, dtype=np.int64)
        features = replace(features, input_ids=ids, labels=np.full_like(ids, -100))
        batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, self.circle_rope)([features], padding_side="left")
        return self.engine.generate(batch, dataset.info, settings, streamer)


def _inference_engine(backend: str, model_dir: str | Path, adapter: str | Path | None, circle_rope: dict | None):
    """The engine's InferenceEngine (backends/<engine>/generate.py) through the one engine registry."""
    from vltune.backends import engine

    return engine(backend, "generate").InferenceEngine(model_dir, adapter, circle_rope)


def backend_name(backend: str) -> str:
    """`torch` or `mindspore` (`ms` is DESIGN.md's spelling of the latter); anything else is an error."""
    from vltune.backends import engine_name

    try:
        return engine_name(backend)
    except ValueError:
        raise ConfigError(f"--backend {backend!r}: expected one of torch, mindspore (or ms)") from None


def answer_prompt(
    model_dir: str | Path,
    prompt: str,
    images: list[str] = (),
    videos: list[str] = (),
    *,
    stream: Callable[[str], None] | None = None,
    **predictor_args,
) -> Answer:
    """One prompt about `images` / `videos`, answered by a fresh `Predictor(model_dir, **predictor_args)`."""
    predictor = Predictor(model_dir, **predictor_args)
    dataset = predictor.dataset([build_prompt_sample(prompt, list(images), list(videos))])
    return predictor.answer(dataset, 0, stream=stream)


def infer(
    model_dir: str | Path,
    prompt: str,
    images: list[str] | None = None,
    max_new_tokens: int = 64,
    backend: str = "torch",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    adapter: str | Path | None = None,
    objective: str = "ar",
    block_length: int | None = None,
    steps: int | None = None,
    remasking: str | None = None,
    temperature: float | None = None,
    seed: int = 0,
    *,
    videos: list[str] | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    thinking: bool = False,
    thinking_budget: int | None = None,
    stream: Callable[[str], None] | None = None,
) -> str:
    """Answer of the model in `model_dir` (plus an optional LoRA adapter) to `prompt` about `images` / `videos`.

    objective "ar": autoregressive decoding of at most `max_new_tokens`, greedy unless `temperature`
    > 0 (or `top_p` / `top_k`) asks for sampling (seeded with `seed`), with `repetition_penalty`,
    `thinking` / `thinking_budget` (see Predictor; the answer after the think block is returned) and
    `stream` receiving the text as it is generated. objective "mdlm": the masked-diffusion
    sampler over a canvas of `max_new_tokens` mask tokens (`block_length`, `steps`, `remasking`,
    `temperature`; None = the values the model was trained with, from its mdlm.json, else the sampler's
    defaults), cut at the first end token.
    """
    if objective not in ("ar", "mdlm"):
        raise ValueError(f"objective {objective!r} is not one of ar, mdlm")
    if objective == "ar":
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed,
        )
        return answer_prompt(
            model_dir, prompt, images or [], videos or [], stream=stream, adapter=adapter, backend=backend,
            min_pixels=min_pixels, max_pixels=max_pixels, settings=settings, thinking=thinking,
            thinking_budget=thinking_budget,
        ).prediction
    _check_model_dir(model_dir, adapter)
    dataset = SFTDataset(
        [build_prompt_sample(prompt, images or [], videos or [])], model_dir, max_length=1 << 30,
        min_pixels=min_pixels, max_pixels=max_pixels,
    )
    # A model trained with Circle-RoPE carries its settings beside the stock config.json.
    circle_rope = _read_json(Path(adapter or model_dir) / CIRCLE_ROPE_FILE)
    features, _ = dataset.prompt(0)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, circle_rope)([features], padding_side="left")
    engine = _inference_engine(backend_name(backend), model_dir, adapter, circle_rope)
    sampler = dict(block_length=block_length, steps=steps, remasking=remasking, temperature=temperature)
    ids = _mdlm_answer(engine, model_dir, adapter, batch, max_new_tokens, sampler, seed)
    return dataset.tokenizer.decode(ids)


def _mdlm_answer(engine, model_dir, adapter, batch, gen_length: int, sampler: dict, seed: int) -> list[int]:
    """The masked-diffusion sampler on `engine` (torch or MindSpore), with the mask id and defaults the
    model was trained with (mdlm.json), else the first spare embedding row."""
    from vltune.core.config import ConfigError
    from vltune.core.mdlm_sampler import SamplerSettings
    from vltune.data.mdlm_tokens import read_mdlm_file, resolve_mdlm_tokens

    saved = read_mdlm_file(adapter, model_dir) or {}
    tokens = resolve_mdlm_tokens(model_dir, saved.get("mask_token", "<|mask|>"))
    mask_id = int(saved.get("mask_token_id", tokens.mask_token_id))
    trained = {"block_length": "mdlm_block_length", "steps": "mdlm_steps", "remasking": "mdlm_remasking", "temperature": "mdlm_temperature"}
    chosen = {k: v if v is not None else saved.get(trained[k]) for k, v in sampler.items()}
    settings = SamplerSettings(
        gen_length=gen_length, schedule=saved.get("noise_schedule", "linear"),
        **{k: v for k, v in chosen.items() if v is not None},
    )
    try:
        settings.resolved()
    except ValueError as e:
        raise ConfigError(f"{e} (set --max-new-tokens, --block-length and --steps to fit)") from None
    return engine.diffusion(batch, settings, mask_id, tuple(tokens.end_token_ids), seed)
