"""Chat-template rendering, tokenisation and the label mask, from a model directory's own files.

Why not transformers' processor: in transformers 5.x the Qwen VL processors cannot be built without
torchvision (their video processor requires it), and data/ must not pull torch in. So this module
reads the same files the processor reads -- `tokenizer.json` through the `tokenizers` library and the
chat template through jinja2 with transformers' environment settings -- and reproduces the
processor's output: the rendered text, tokenised, with each `<|image_pad|>` expanded to the image's
merged token count.

Labels come from the template's *structure*: for assistant turn i, the characters between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) are the answer plus its
`<|im_end|>\\n`. Every token overlapping those spans is trained; everything else is -100. Searching
for the word "assistant" (as the official scripts do) would mislabel user text that contains it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..core.contracts import IGNORE_INDEX


def _raise_exception(message: str):
    raise TemplateError(message)


def _load_template(model_dir: Path) -> str:
    """The chat template, wherever transformers 4.x or 5.x put it."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    raise FileNotFoundError(f"{model_dir}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")


class ChatTokenizer:
    """Renders and tokenises conversations exactly as the model's processor does."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # transformers renders with trim_blocks/lstrip_blocks and these helpers; so must we.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(_load_template(model_dir))

        def token_id(tok: str) -> int:
            tid = self.tokenizer.token_to_id(tok)
            if tid is None:
                raise ValueError(f"{model_dir}: tokenizer has no {tok} token")
            return tid

        self.image_token_id = token_id("<|image_pad|>")
        self.video_token_id = token_id("<|video_pad|>")
        self.vision_start_token_id = token_id("<|vision_start|>")
        self.im_end_id = token_id("<|im_end|>")
        self.pad_token_id = token_id("<|endoftext|>")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def _assistant_spans(self, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix "
                    f"(assistant turn {i}); cannot locate answer spans"
                )
            spans.append((len(before), len(through)))
        return spans

    def _expand_media(self, ids: list[int], labels: list[int], n_image_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Replace the k-th `<|image_pad|>` with n_image_tokens[k] copies (labels -100)."""
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) != len(n_image_tokens):
            raise ValueError(f"{len(pads)} image placeholder(s) in the rendered text but {len(n_image_tokens)} image(s)")
        out_ids: list[int] = []
        out_labels: list[int] = []
        k = 0
        for tok, lab in zip(ids, labels):
            if tok == self.image_token_id:
                out_ids.extend([tok] * n_image_tokens[k])
                out_labels.extend([IGNORE_INDEX] * n_image_tokens[k])
                k += 1
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return np.asarray(out_ids, dtype=np.int64), np.asarray(out_labels, dtype=np.int64)

    def encode_chat(self, messages: list[dict[str, Any]], n_image_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of a whole conversation; only assistant answers (+ `<|im_end|>\\n`) are trained."""
        text = self.render(messages)
        spans = self._assistant_spans(messages, text)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        labels = [
            tok if any(start < end_ and end > start_ for start_, end_ in spans) else IGNORE_INDEX
            for tok, (start, end) in zip(enc.ids, enc.offsets)
        ]
        return self._expand_media(enc.ids, labels, n_image_tokens)

    def encode_prompt(self, messages: list[dict[str, Any]], n_image_tokens: list[int]) -> np.ndarray:
        """input_ids of `messages` followed by the generation prompt (`<|im_start|>assistant\\n`)."""
        text = self.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        input_ids, _ = self._expand_media(ids, [IGNORE_INDEX] * len(ids), n_image_tokens)
        return input_ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
