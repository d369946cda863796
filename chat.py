"""`vltune.load(model_dir).chat(prompt, images=[...])`: the Python API of `vltune infer`.

`load` reads a trained (or any HF-format) model directory, optionally with a LoRA adapter, once;
`ChatModel.chat` answers one prompt about images and videos per call, each call with its own
decoding options (thinking, thinking budget, length, sampling). Everything goes through
inference.Predictor, the code behind `vltune infer`, so a greedy `chat` answer is the command's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from vltune.core.generation import GenerationSettings
from vltune.data.dataset import SFTDataset
from vltune.inference import Answer, Predictor, build_prompt_sample

PathLike = str | os.PathLike


def _paths(value: PathLike | Sequence[PathLike] | None, what: str) -> list[str]:
    """`images=` / `videos=` as a list of path strings: one path, a list of paths, or None."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what}: expected a file path or a list of file paths, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, (str, os.PathLike)):
            got = f"a PIL image ({type(item).__name__}); save it to a file and pass the path" if type(item).__module__.startswith("PIL") else type(item).__name__
            raise TypeError(f"{what}: expected file paths (str or pathlib.Path), got {got}")
    return [os.fspath(item) for item in value]


class ChatModel:
    """One loaded model (plus adapter) answering prompts; build it with `vltune.load`. Not thread-safe."""

    def __init__(self, predictor: Predictor):
        self._predictor = predictor
        # One prompt dataset per thinking flag (the chat template renders with it): the tokenizer and
        # processor config are read once, and each call only swaps in its one sample.
        self._datasets: dict[bool, SFTDataset] = {}

    @property
    def model(self):
        """The loaded model: a transformers model (backend torch) or the native MindSpore one."""
        return self._predictor.model

    @property
    def backend(self) -> str:
        return self._predictor.backend

    def __repr__(self) -> str:
        return f"ChatModel({str(self._predictor.model_dir)!r}, backend={self.backend!r})"

    def chat(
        self,
        prompt: str,
        images: PathLike | Sequence[PathLike] | None = None,
        videos: PathLike | Sequence[PathLike] | None = None,
        *,
        thinking: bool = False,
        thinking_budget: int | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int = 0,
        stream: Callable[[str], None] | None = None,
    ) -> Answer:
        """The model's answer to `prompt` about `images`, then `videos` (file paths), as `vltune infer` gives it.

        Greedy unless `temperature` > 0 (or `top_p` / `top_k`) asks for sampling, seeded with `seed`.
        `thinking` renders the prompt with `enable_thinking=True`; `thinking_budget` N closes a reasoning
        still open after N tokens and lets the model answer; `max_new_tokens` bounds reasoning and answer
        together. `stream` gets the generated text piece by piece. Returns an `Answer`: `.prediction` the
        answer (also `str(answer)`), `.thinking` the reasoning (None when no think block was open), `.text`
        everything generated, `.thinking_cut`, `.generated_tokens`.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        sample = build_prompt_sample(prompt, _paths(images, "images"), _paths(videos, "videos"), source="chat()")
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed,
        )
        predictor = self._predictor.with_options(settings, bool(thinking), thinking_budget)
        if predictor.thinking not in self._datasets:
            self._datasets[predictor.thinking] = predictor.dataset([])
        dataset = self._datasets[predictor.thinking]
        dataset.samples = [sample]
        return predictor.answer(dataset, 0, stream=stream)


def load(
    model_dir: PathLike,
    adapter: PathLike | None = None,
    *,
    backend: str = "torch",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ChatModel:
    """Load `model_dir` (an HF-format directory, e.g. a training run's output_dir), plus a LoRA `adapter`
    directory trained on it, with `backend` torch or mindspore (ms). Pixel limits default to the
    training run's (its recipe.json beside the model or adapter), else the processor's."""
    return ChatModel(Predictor(model_dir, adapter=adapter, backend=backend, min_pixels=min_pixels, max_pixels=max_pixels))
