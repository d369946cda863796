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
) -> str:
    """Greedy answer of the model in `model_dir` (plus an optional LoRA adapter) to `prompt` about `images`."""
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
    if circle_rope:
        (ids,) = generate_with_positions(model, batch, max_new_tokens, CircleRopeAdapter(model, circle_rope))
    else:
        (ids,) = generate_greedy(model, batch, dataset.info, max_new_tokens)
    return dataset.tokenizer.decode(ids)
