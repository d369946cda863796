"""The special tokens masked diffusion needs, read from (and written into) a model directory.

Qwen tokenizers have no mask token. Their embedding, though, has spare rows past the tokenizer's
last id (151,936 rows for 151,665 tokens in Qwen2.5-VL; the tiny models keep >= 16), so `<|mask|>`
takes the first spare row: no resize, and the released weights stay as they are. A model trained with
MDLM is saved with `<|mask|>` in its tokenizer files and an `mdlm.json` beside config.json, so
inference finds the same id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from ..core.families import read_config

MDLM_FILE = "mdlm.json"


@dataclass(frozen=True)
class MdlmTokens:
    mask_token: str
    mask_token_id: int
    in_tokenizer: bool
    """False when the id is the first spare embedding row and the tokenizer does not know it yet."""
    protected_ids: tuple[int, ...]
    """Never masked: image/video placeholders and the vision start/end markers."""
    end_token_ids: tuple[int, ...]
    """generation_config's eos ids (<|im_end|>, <|endoftext|>), where sampling stops."""
    pad_token_id: int


def _embedding_rows(config: dict) -> int:
    return int(config.get("text_config", config)["vocab_size"])


def _eos_ids(model_dir: Path, config: dict) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    if eos is None:
        eos = config.get("text_config", config).get("eos_token_id")
    if eos is None:
        raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or config.json; the sampler needs an end token")
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def resolve_mdlm_tokens(model_dir: str | Path, mask_token: str = "<|mask|>") -> MdlmTokens:
    """The mask id (the tokenizer's, or else the first spare embedding row) and the other ids MDLM uses."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = _embedding_rows(config)
    known = tokenizer.token_to_id(mask_token)
    mask_id = known if known is not None else tokenizer.get_vocab_size(with_added_tokens=True)
    if mask_id >= rows:
        raise ValueError(
            f"{model_dir}: no spare embedding row for {mask_token}: the tokenizer uses {mask_id} ids and the "
            f"embedding has {rows} rows; resizing is not supported (pick a model whose vocab_size has room)"
        )

    def token_id(token: str, config_key: str) -> int:
        tid = config.get(config_key, tokenizer.token_to_id(token))
        if tid is None:
            raise ValueError(f"{model_dir}: neither config.json ({config_key}) nor the tokenizer knows {token}")
        return int(tid)

    protected = (
        token_id("<|image_pad|>", "image_token_id"),
        token_id("<|video_pad|>", "video_token_id"),
        token_id("<|vision_start|>", "vision_start_token_id"),
        token_id("<|vision_end|>", "vision_end_token_id"),
    )
    pad = tokenizer.token_to_id("<|endoftext|>")
    if pad is None:
        raise ValueError(f"{model_dir}: the tokenizer has no <|endoftext|> token")
    return MdlmTokens(mask_token, int(mask_id), known is not None, protected, _eos_ids(model_dir, config), int(pad))


def _replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_mdlm_files(out_dir: str | Path, mask_token: str, mask_token_id: int, settings: dict) -> None:
    """Make a saved model directory MDLM-complete: `mask_token` in tokenizer.json (and in
    tokenizer_config.json's added_tokens_decoder when it has one) at `mask_token_id`, and `mdlm.json`
    with the mask token, its id and the recipe's MDLM settings."""
    out_dir = Path(out_dir)
    tokenizer_file = out_dir / "tokenizer.json"
    if tokenizer_file.exists():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        if tokenizer.token_to_id(mask_token) is None:
            tokenizer.add_special_tokens([AddedToken(mask_token, special=True, normalized=False)])
            got = tokenizer.token_to_id(mask_token)
            if got != mask_token_id:
                raise ValueError(f"{mask_token} would get id {got} in {tokenizer_file}, not the trained {mask_token_id}")
            _replace_atomically(tokenizer_file, tokenizer.to_str())
    config_file = out_dir / "tokenizer_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict) and str(mask_token_id) not in decoder:
            decoder[str(mask_token_id)] = {
                "content": mask_token, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True,
            }
            _replace_atomically(config_file, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    info = {"objective": "mdlm", "mask_token": mask_token, "mask_token_id": mask_token_id, **settings}
    _replace_atomically(out_dir / MDLM_FILE, json.dumps(info, indent=2) + "\n")


def read_mdlm_file(*dirs: str | Path | None) -> dict | None:
    """The first `mdlm.json` among `dirs` (an adapter directory before its base model), or None."""
    for directory in dirs:
        if directory is not None and (Path(directory) / MDLM_FILE).exists():
            return json.loads((Path(directory) / MDLM_FILE).read_text())
    return None
