"""A small byte-level BPE tokenizer with the Qwen special tokens, trained offline.

Why train one: no hub is reachable from our machines, and the tests and the demo need a tokenizer
that behaves like Qwen's (same normalizer, same pre-tokenizer regex, byte-level BPE, same special
tokens in the same order, same chat template) but is small enough that the embedding of a tiny
model stays tiny. Only the merges differ from the real one.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The pre-tokenizer pattern of Qwen2/2.5/3 (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen's added tokens in the order of the released vocabularies (151643 onwards). The first
# fourteen are "special" (stripped when decoding with skip_special_tokens); the rest are ordinary
# added tokens, as in the released tokenizer_config.json files.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Text the merges are learnt from: the chat scaffolding, the synthetic VQA vocabulary and plain
# English, so that prompts of the demo become short token sequences.
_BASE_CORPUS = """\
system user assistant You are a helpful assistant.
What color is the circle? What color is the square? What color is the triangle? What color is the star?
What colour is the shape? Which color does the shape have? Name the color of the object in the picture.
What shape is in the image? Which shape do you see? Name the shape in the picture.
How many circles are there? How many squares are in the image? Count the triangles. How many stars?
Where is the circle? Where is the square located? In which part of the image is the triangle?
red green blue yellow purple orange white black pink brown gray grey cyan magenta
circle square triangle star diamond cross heart hexagon ellipse rectangle
top left top right bottom left bottom right center middle above below beside
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
Describe the image. The image shows a picture of a small object on a plain background.
Let me think step by step. The answer is yes no maybe because therefore so first second then finally.
The quick brown fox jumps over the lazy dog. A large language model reads text and images.
Please answer the question with a single word. Answer briefly. Look at the image carefully.
"""


def train_qwen_style_tokenizer(extra_corpus: list[str] | None = None, vocab_size: int = 1024) -> Tokenizer:
    """Train a byte-level BPE with Qwen's normalizer/pre-tokenizer and return the raw `tokenizers` object.

    The added tokens are *not* part of the trained model; `build_transformers_tokenizer` appends them
    after the BPE vocabulary, as Qwen's own vocabulary does.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    corpus = _BASE_CORPUS.splitlines() * 20 + list(extra_corpus or [])
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_transformers_tokenizer(bpe: Tokenizer, chat_template: str, media=None):
    """Wrap the trained BPE as transformers' `Qwen2Tokenizer` with Qwen's added tokens and template, plus
    a family's own media tokens (`media`: its MediaRule; Ovis2.5's indicator tokens), which are also
    named as the tokenizer's image/video tokens so that transformers' processor finds them."""
    from transformers import Qwen2Tokenizer

    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    # Add in Qwen's order first, then point eos at <|im_end|> as the released Instruct tokenizers do
    # (naming it in the constructor would give it the first added id).
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    if media is not None and media.added_tokens:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in media.added_tokens], special_tokens=True)
        (image_open, image_pad, image_close), (video_open, video_pad, video_close) = media.image_tokens, media.video_tokens
        tokenizer._set_model_specific_special_tokens({
            "image_token": image_pad, "video_token": video_pad, "image_start_token": image_open,
            "image_end_token": image_close, "video_start_token": video_open, "video_end_token": video_close,
        })
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = chat_template
    return tokenizer
