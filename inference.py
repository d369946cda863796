"""`vltune infer`: one prompt (with images) through a trained or tiny model directory."""

from __future__ import annotations

import json
from pathlib import Path

from vltune.data.collate import Collator
from vltune.data.dataset import SFTDataset
from vltune.data.formats import Sample


def build_prompt_sample(prompt: str, images: list[str]) -> Sample:
    """A one-turn user message with the images first, as the Qwen examples and processors place them."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    # The empty answer turn is dropped by SFTDataset.prompt(); it only marks where generation starts.
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    return Sample(id="prompt", messages=messages, images=[Path(p) for p in images], source="command line")


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
) -> str:
    """Answer of the model in `model_dir` (plus an optional LoRA adapter) to `prompt` about `images`.

    objective "ar": greedy decoding of at most `max_new_tokens`. objective "mdlm": the masked-diffusion
    sampler over a canvas of `max_new_tokens` mask tokens (`block_length`, `steps`, `remasking`,
    `temperature`; None = the values the model was trained with, from its mdlm.json, else the sampler's
    defaults), cut at the first end token.
    """
    if objective not in ("ar", "mdlm"):
        raise ValueError(f"objective {objective!r} is not one of ar, mdlm")
    if backend != "torch":
        raise NotImplementedError(f"infer --backend {backend}: not implemented yet (only torch is)")
    from vltune.backends.torch.checkpoint import CIRCLE_ROPE_FILE
    from vltune.backends.torch.infer import generate_greedy, generate_with_positions
    from vltune.backends.torch.models import load_model
    from vltune.backends.torch.models.circle_rope import CircleRopeAdapter

    if adapter is None and (Path(model_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{model_dir} holds a LoRA adapter, not a model: use --model BASE_MODEL_DIR --adapter {model_dir} "
            "(or vltune merge-lora to make a full model)"
        )
    dataset = SFTDataset(
        [build_prompt_sample(prompt, images or [])], model_dir, max_length=1 << 30,
        min_pixels=min_pixels, max_pixels=max_pixels,
    )
    # A model trained with Circle-RoPE carries its settings beside the stock config.json.
    circle_file = Path(adapter or model_dir) / CIRCLE_ROPE_FILE
    circle_rope = json.loads(circle_file.read_text()) if circle_file.exists() else None
    features, _ = dataset.prompt(0)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, circle_rope)([features], padding_side="left")
    model = load_model(model_dir, adapter=adapter)
    if objective == "mdlm":
        sampler = dict(block_length=block_length, steps=steps, remasking=remasking, temperature=temperature)
        adapter_circle = CircleRopeAdapter(model, circle_rope) if circle_rope else None
        ids = _mdlm_answer(model, model_dir, adapter, batch, max_new_tokens, sampler, seed, adapter_circle)
        return dataset.tokenizer.decode(ids)
    if circle_rope:
        (ids,) = generate_with_positions(model, batch, max_new_tokens, CircleRopeAdapter(model, circle_rope))
    else:
        (ids,) = generate_greedy(model, batch, dataset.info, max_new_tokens)
    return dataset.tokenizer.decode(ids)


def _mdlm_answer(model, model_dir, adapter, batch, gen_length: int, sampler: dict, seed: int, circle) -> list[int]:
    """The masked-diffusion sampler on a bidirectional copy of the model's attention, with the mask id
    and defaults the model was trained with (mdlm.json), else the first spare embedding row."""
    from vltune.backends.torch.mdlm import diffusion_sample
    from vltune.backends.torch.models.bidirectional import make_bidirectional
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
    make_bidirectional(model)
    (ids,) = diffusion_sample(model, batch, settings, mask_token_id=mask_id, end_token_ids=tokens.end_token_ids, seed=seed, circle=circle)
    return ids
