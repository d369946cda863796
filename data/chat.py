"""Chat-template rendering, tokenisation and the label mask, from a model directory's own files.

Why not transformers' processor: in transformers 5.x the Qwen VL processors cannot be built without
torchvision (their video processor requires it), and data/ must not pull torch in. So this module
reads the same files the processor reads -- `tokenizer.json` through the `tokenizers` library and the
chat template through jinja2 with transformers' environment settings -- and reproduces the
processor's output: the rendered text, tokenised, with each image tag the template writes (Qwen's
`<|image_pad|>`, Ovis2.5's `<image>`) expanded to the image's merged token count, wrapped as the
family's processor wraps it (`MediaRule.image_tokens`).

Labels come from the template's *structure*: for assistant turn i, the characters between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) are the answer plus its
`<|im_end|>\\n`. Every token overlapping those spans is trained; everything else is -100. Searching
for the word "assistant" (as the official scripts do) would mislabel user text that contains it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..core.contracts import IGNORE_INDEX
from ..core.families import MediaRule, family_of_config, read_config


EMPTY_THINK = "<think>\n\n</think>\n\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>\n"


def _text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _shift(pos: int, shifts: list[tuple[int, int]]) -> int:
    """A position of the rendered text moved past the media expansions that precede it."""
    return pos + sum(added for at, added in shifts if at < pos)


def _raise_exception(message: str):
    raise TemplateError(message)


class TextTooLong(ValueError):
    """A rendered conversation with more characters than `max_tokens` tokens can hold: it was not tokenised.
    `max_tokens` is the recipe's model_max_length (the only limit encode_chat is given), named so."""

    def __init__(self, n_chars: int, max_tokens: int, chars_per_token: int):
        self.n_chars, self.max_tokens, self.chars_per_token = n_chars, max_tokens, chars_per_token
        super().__init__(
            f"{n_chars} characters, more than model_max_length {max_tokens} tokens can hold (a token of this tokenizer covers at "
            f"most {chars_per_token} characters)"
        )


# Unicode normalizers whose output has at least 1/4 as many characters as their input: NFC/NFKC only
# compose, and a composed character decomposes canonically into at most 4 (e.g. U+1F82; checked over
# all of Unicode by tests/unit/data/test_hostile_data.py). Any other normalizer disables the bound.
_COMPOSING_NORMALIZERS = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1}


def _chars_per_token(spec: dict) -> int | None:
    """An upper bound on the characters of input text one token covers, or None; `spec` is the tokenizer's
    JSON (tokenizer.json's content).

    Only for byte-level BPE (Qwen's): every token is a byte string of its vocabulary entry's length (one
    character of the byte-level alphabet per byte), and every byte is covered by some token, so a token
    covers at most `longest entry` bytes, hence as many characters. Added tokens cover their own content.
    The normalizer may merge up to N characters into one first (NFC). Other tokenizer kinds (WordPiece's
    [UNK] may cover a whole word) get no bound: their texts are always tokenised.
    """
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = [pre] if pre and pre.get("type") != "Sequence" else (pre or {}).get("pretokenizers", [])
    if model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps):
        return None
    factor = 1
    norms = [] if normalizer is None else normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    for norm in norms:
        if norm.get("type") not in _COMPOSING_NORMALIZERS:
            return None
        factor *= _COMPOSING_NORMALIZERS[norm["type"]]
    longest = max(
        [len(token) for token in model.get("vocab", {})] + [len(added["content"]) for added in spec.get("added_tokens", [])]
    )
    return factor * longest


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


def _family_of_dir(model_dir: Path):
    """The family of a model directory's config.json, or None for a tokenizer-only directory (the Qwen
    rules then; a config.json naming an unknown family is an error, never a fallback)."""
    if not (model_dir / "config.json").exists():
        return None
    return family_of_config(read_config(model_dir), str(model_dir / "config.json"))


class ChatTokenizer:
    """Renders and tokenises conversations exactly as the model's processor does."""

    def __init__(self, model_dir: str | Path, template_kwargs: dict[str, Any] | None = None):
        """`template_kwargs`: extra variables for every render of the chat template, e.g.
        `{"enable_thinking": True}` for templates with a thinking switch.

        The family (config.json's model_type) says how media tags expand (`MediaRule`), and may replace the
        directory's template for training data (`FamilySpec.training_chat_template`: Ovis2.5's released
        template drops the reasoning its recipe trains)."""
        self.template_kwargs = dict(template_kwargs or {})
        self.model_dir = model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        family = _family_of_dir(model_dir)
        self.media: MediaRule = family.media if family is not None else MediaRule()
        self.trains_turn_newline = family.trains_turn_newline if family is not None else True
        # transformers renders with trim_blocks/lstrip_blocks and these helpers; so must we.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        training = family.training_chat_template if family is not None else None
        self.template = env.from_string(training or _load_template(model_dir))
        self._tags = re.compile(re.escape(self.media.image_tag) + "|" + re.escape(self.media.video_tag))

        def token_id(tok: str) -> int:
            tid = self.tokenizer.token_to_id(tok)
            if tid is None:
                raise ValueError(f"{model_dir}: tokenizer has no {tok} token")
            return tid

        self.image_token_id = token_id(self.media.image_tokens[1])
        self.video_token_id = token_id(self.media.video_tokens[1])
        self.span_open_ids = tuple(token_id(t) for t in self.media.span_open)
        self.span_close_ids = tuple(token_id(t) for t in self.media.span_close)
        self.im_end_id = token_id("<|im_end|>")
        self.pad_token_id = token_id("<|endoftext|>")

    def __reduce__(self):
        """Pickled as its arguments (the template's helpers are lambdas): the data loader's worker
        processes (data/workers.py) rebuild it from the model directory."""
        return ChatTokenizer, (self.model_dir, self.template_kwargs)

    @cached_property
    def max_chars_per_token(self) -> int | None:
        """At most this many characters of a text make one token (None: no safe bound for this tokenizer).

        So a text of more than `max_chars_per_token * N` characters has more than N tokens: a huge
        record is refused by its length alone, without tokenising it (`encode_chat`'s `max_tokens`)."""
        return _chars_per_token(json.loads(self.tokenizer.to_str()))  # the loaded tokenizer's spec: no second read

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **{**self.template_kwargs, **kwargs})

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
            start = len(before)
            # Templates with a thinking mode give an answer without reasoning an empty think block;
            # the model did not write it, so it is not trained (an answer's own <think> is). The block
            # follows the assistant header, whether the generation prompt ends there or has already
            # opened `<think>\n` (a template whose thinking is on by default, Qwen3.5's).
            if "<think>" not in _text_of(message):
                header = before.rfind(ASSISTANT_HEADER)
                opened = header + len(ASSISTANT_HEADER) if header >= 0 else start
                if text.startswith(EMPTY_THINK, opened):
                    start = max(start, opened + len(EMPTY_THINK))
            end = len(through)
            if not self.trains_turn_newline and through.endswith(TURN_END):
                end -= 1  # the Ovis recipe trains the answer through <|im_end|>, not the newline after it
            spans.append((start, end))
        return spans

    def _expand_media(self, text: str, image_repl: list[str], video_repl: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """Replace the k-th image / video tag (`<|image_pad|>` / `<|video_pad|>`, Ovis2.5's `<image>` /
        `<video>`) with its replacement, as the processor does.

        Returns the expanded text and (position in the original text, length added) per replacement,
        so character spans of the rendered text can be moved onto the expanded one.
        """
        found = [m for m in self._tags.finditer(text)]
        n_images = sum(m.group() == self.media.image_tag for m in found)
        if n_images != len(image_repl) or len(found) - n_images != len(video_repl):
            raise ValueError(
                f"{n_images} image and {len(found) - n_images} video placeholder(s) in the rendered text but "
                f"{len(image_repl)} image(s) and {len(video_repl)} video(s)"
            )
        images, videos = iter(image_repl), iter(video_repl)
        pieces, shifts, last = [], [], 0
        for m in found:
            repl = next(images) if m.group() == self.media.image_tag else next(videos)
            pieces += [text[last : m.start()], repl]
            shifts.append((m.start(), len(repl) - len(m.group())))
            last = m.end()
        pieces.append(text[last:])
        return "".join(pieces), shifts

    def encode_chat(
        self, messages: list[dict[str, Any]], image_repl: list[str], video_repl: list[str] = (), max_tokens: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of a whole conversation; only assistant answers (+ `<|im_end|>\\n`) are trained.

        `image_repl` / `video_repl`: what each image's / video's pad token becomes (see `image_placeholder`).
        `max_tokens`: raise TextTooLong, before tokenising, for a rendered text that must exceed it (the
        media expansion only adds characters, so the rendered text's length is a safe lower bound).
        """
        rendered = self.render(messages)
        bound = self.max_chars_per_token if max_tokens is not None else None
        if bound is not None and len(rendered) > bound * max_tokens:
            raise TextTooLong(len(rendered), max_tokens, bound)
        spans = self._assistant_spans(messages, rendered)
        text, shifts = self._expand_media(rendered, list(image_repl), list(video_repl))
        moved = [(_shift(a, shifts), _shift(b, shifts)) for a, b in spans]
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        labels = [
            tok if any(start < end_ and end > start_ for start_, end_ in moved) else IGNORE_INDEX
            for tok, (start, end) in zip(enc.ids, enc.offsets)
        ]
        return np.asarray(enc.ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def encode_prompt(self, messages: list[dict[str, Any]], image_repl: list[str], video_repl: list[str] = (),
                      answer: dict[str, Any] | None = None) -> np.ndarray:
        """input_ids of `messages` followed by the generation prompt (`<|im_start|>assistant\\n`).

        With the reference `answer` (evaluation): the conversation with that answer, cut where its trained
        span starts, so the model is prompted exactly as training showed it the answer. The same as the
        generation prompt, except that a thinking template's empty think block before an answer without
        reasoning is included (what the model saw and was not trained to write)."""
        if answer is None:
            rendered = self.render(messages, add_generation_prompt=True)
        else:
            conversation = [*messages, answer]
            full = self.render(conversation)
            rendered = full[: self._assistant_spans(conversation, full)[-1][0]]
        text, _ = self._expand_media(rendered, list(image_repl), list(video_repl))
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def image_placeholder(self, n_tokens: int) -> str:
        """What one image's tag becomes: one pad per merged patch, inside the family's open/close tokens."""
        opening, pad, closing = self.media.image_tokens
        return opening + pad * n_tokens + closing

    def video_pads(self, n_tokens: int) -> str:
        """A video's pads for `n_tokens` merged patches (the whole video, or one frame group of Qwen3-VL's)."""
        return self.media.video_tokens[1] * n_tokens

    def video_placeholder(self, n_tokens: int) -> str:
        """What one video's tag becomes when its pads form one span (`MediaRule.video_placeholder` "pads")."""
        opening, _, closing = self.media.video_tokens
        return opening + self.video_pads(n_tokens) + closing

    def open_spans(self, ids: np.ndarray) -> int:
        """How many media spans are open at the end of `ids` (0: a cut there splits none)."""
        return int(np.isin(ids, self.span_open_ids).sum() - np.isin(ids, self.span_close_ids).sum())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
