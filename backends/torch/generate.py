"""Generation with a transformers Qwen VL model from a numpy batch: greedy or sampled, optionally streamed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contextlib import nullcontext

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from vltune.core.contracts import Batch
from vltune.core.generation import GenerationSettings
from vltune.core.generation import TextStream as CoreTextStream
from vltune.data.model_info import ModelInfo

from .batch import MODEL_INPUTS, mm_token_types, to_model_inputs, to_tensor


class TextStream(CoreTextStream, BaseStreamer):
    """core.generation.TextStream typed as a transformers streamer, for generate(streamer=...)."""


def generation_kwargs(settings: GenerationSettings) -> dict:
    """generate() options for `settings`, all explicit so the model's generation_config.json adds nothing.

    Greedy decoding gets the neutral values (temperature 1, top_p 1, top_k 50) transformers validates
    without warnings; sampling turns unset filters off (top_k 0, top_p 1).
    """
    sample = settings.do_sample
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": sample,
        "temperature": (settings.temperature or 1.0) if sample else 1.0,
        "top_p": settings.top_p if sample and settings.top_p is not None else 1.0,
        "top_k": (settings.top_k or 0) if sample else 50,
        "repetition_penalty": settings.repetition_penalty or 1.0,
    }


def logits_processors(settings: GenerationSettings, attention_mask: torch.Tensor) -> LogitsProcessorList:
    """The processors generate() would build for `settings`, in its order, for decoding loops of our own."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty not in (None, 1.0):
        pad_lengths = (attention_mask != 0).int().argmax(dim=1)  # left padding is not "already generated"
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty, prompt_ignore_length=pad_lengths))
    if settings.do_sample:
        if settings.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def _cut_at_end(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Each row up to (without) its first end token."""
    return [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


@torch.no_grad()
def generate(
    model,
    batch: Batch,
    info: ModelInfo,
    settings: GenerationSettings = GenerationSettings(),
    *,
    circle=None,
    streamer: BaseStreamer | None = None,
    autocast_dtype=None,
) -> list[list[int]]:
    """Continuation ids of each left-padded prompt row, cut at the first end token.

    transformers 5.x builds the 3D M-RoPE ids itself from `mm_token_type_ids` (0 text, 1 image,
    2 video) at prefill and continues from its rope_deltas while decoding with the KV cache. A
    Circle-RoPE model (`circle`: its CircleRopeAdapter) decodes in `generate_with_positions` instead.
    Sampling draws from torch's global generator, seeded with `settings.seed`.
    """
    if circle is not None:
        return generate_with_positions(
            model, batch, settings.max_new_tokens, circle, autocast_dtype=autocast_dtype, settings=settings, streamer=streamer
        )
    device = next(model.parameters()).device
    model.eval()
    # position_ids stay out: generate() derives them (and their decode-time deltas) itself.
    inputs = to_model_inputs(batch, device, {k: v for k, v in MODEL_INPUTS.items() if k != "position_ids"}, model=model)
    mm_types = mm_token_types(inputs["input_ids"], info.image_token_id, info.video_token_id)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model.generate(**inputs, mm_token_type_ids=mm_types, streamer=streamer, **generation_kwargs(settings))
    return _cut_at_end(out[:, inputs["input_ids"].shape[1] :].tolist(), set(_eos_ids(model)))


def generate_greedy(model, batch: Batch, info: ModelInfo, max_new_tokens: int, autocast_dtype=None) -> list[list[int]]:
    """Greedy continuation of each prompt row (the trainer's evaluation decodes with this)."""
    return generate(model, batch, info, GenerationSettings(max_new_tokens=max_new_tokens), autocast_dtype=autocast_dtype)


def _next_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] the position of each row's next text token: max over its real tokens and channels, + 1."""
    masked = position_ids.masked_fill(attention_mask[None] == 0, torch.finfo(torch.float32).min if position_ids.is_floating_point() else torch.iinfo(position_ids.dtype).min)
    return masked.amax(dim=(0, 2)) + 1


@torch.no_grad()
def generate_with_positions(
    model,
    batch: Batch,
    max_new_tokens: int,
    adapter=None,
    use_cache: bool = True,
    autocast_dtype=None,
    settings: GenerationSettings | None = None,
    streamer: BaseStreamer | None = None,
) -> list[list[int]]:
    """Decoding that keeps vltune's own position ids (Circle-RoPE, AGE alt ids) throughout.

    transformers' generate() would rebuild plain M-RoPE ids from its own get_rope_index, so this loop
    feeds `position_ids` (and `position_ids_alt`) itself: each new token sits at the row's next text
    position in *each* position set, which is the decode-time rope delta done right for both kinds of
    layer. `use_cache=False` recomputes the whole sequence every step (the reference for tests).
    Greedy unless `settings` asks for sampling (the same processors generate() applies; a
    torch.Generator seeded with `settings.seed`); `settings.max_new_tokens` is not read here.
    """
    device = next(model.parameters()).device
    model.eval()
    inputs = to_model_inputs(batch, device, model=model)
    ids, attention, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    alt = to_tensor(batch["position_ids_alt"], device, torch.long) if "position_ids_alt" in batch else None
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    next_pos = _next_positions(positions, attention)
    next_alt = _next_positions(alt, attention) if alt is not None else None
    eos = torch.tensor(_eos_ids(model), device=device)
    processors = logits_processors(settings, attention) if settings is not None else LogitsProcessorList()
    sampler = torch.Generator(device).manual_seed(settings.seed) if settings is not None and settings.do_sample else None
    if streamer is not None:
        streamer.put(ids.cpu())

    batch_size = ids.shape[0]
    generated = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    past = None
    step_ids, step_pos, step_alt = ids, positions, alt
    for step in range(max_new_tokens):
        fresh = past is None
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            context = adapter.alt_positions(step_alt) if adapter is not None else nullcontext()
            with context:
                out = model(
                    input_ids=step_ids, attention_mask=attention, position_ids=step_pos,
                    past_key_values=past, use_cache=use_cache, **(vision if fresh or not use_cache else {}),
                )
        scores = out.logits[:, -1].float()
        if processors:
            scores = processors(torch.cat([ids, generated], dim=1), scores)
        if sampler is not None:
            token = torch.multinomial(scores.softmax(-1), 1, generator=sampler)[:, 0]
        else:
            token = scores.argmax(-1)
        token = torch.where(finished, eos[0], token)
        generated = torch.cat([generated, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        new_pos = (next_pos + step).to(positions.dtype).view(1, -1, 1).expand(3, -1, 1)
        new_alt = (next_alt + step).to(alt.dtype).view(1, -1, 1).expand(3, -1, 1) if alt is not None else None
        if use_cache:
            past = out.past_key_values
            step_ids, step_pos, step_alt = token[:, None], new_pos, new_alt
        else:
            step_ids = torch.cat([step_ids, token[:, None]], dim=1)
            step_pos = torch.cat([step_pos, new_pos], dim=2)
            step_alt = torch.cat([step_alt, new_alt], dim=2) if alt is not None else None

    if streamer is not None:
        streamer.end()
    return _cut_at_end(generated.tolist(), set(eos.tolist()))


class InferenceEngine:
    """What `vltune infer` drives (inference.py, through backends.engine): the transformers model (plus a
    peft adapter); generate() with its KV cache, or vltune's own decoding loop for Circle-RoPE (its
    CircleRopeAdapter). The MindSpore twin is backends/mindspore/generate.py's InferenceEngine."""

    def __init__(self, model_dir: str | Path, adapter: str | Path | None, circle_rope: dict | None):
        from .models import load_model
        from .models.circle_rope import CircleRopeAdapter

        self.model = load_model(model_dir, adapter=adapter)
        self.circle = CircleRopeAdapter(self.model, circle_rope) if circle_rope else None

    def text_stream(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        return TextStream(decode, write)

    def generate(self, batch: Batch, info: ModelInfo, settings: GenerationSettings, streamer) -> list[int]:
        (out,) = generate(self.model, batch, info, settings, circle=self.circle, streamer=streamer)
        return out

    def diffusion(self, batch: Batch, settings, mask_token_id: int, end_token_ids: tuple[int, ...], seed: int) -> list[int]:
        """The masked-diffusion sampler on the model with its text attention made bidirectional."""
        from .mdlm import diffusion_sample
        from .models.bidirectional import make_bidirectional

        make_bidirectional(self.model)
        (ids,) = diffusion_sample(self.model, batch, settings, mask_token_id=mask_token_id, end_token_ids=end_token_ids, seed=seed, circle=self.circle)
        return ids
