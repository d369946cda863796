"""Readers for annotation files, turning each record into one chat `Sample`.

Supported here: LLaVA/ShareGPT `conversations` (from human/gpt/system) and OpenAI-style `messages`
(role/content) with an `image` key holding one path or a list, in JSON (a list) or JSONL files.
Every problem is a `SampleError` that names the file, the line or index, the sample id and the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAG_SPLIT = re.compile(r"(<image>|<video>)")


class SampleError(ValueError):
    """A sample that cannot be trained on; the message says which one and why."""


@dataclass
class Sample:
    """One conversation with its media, in the OpenAI message layout the chat templates expect."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Path] = field(default_factory=list)
    source: str = ""
    """Where it came from, `file:line`, for error messages."""

    @property
    def where(self) -> str:
        return f"{self.source} (id {self.id})"


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(`file:line` or `file:[index]`, record) pairs of a JSON list or a JSONL file."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"{path}: annotation file does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SampleError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SampleError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise SampleError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return [(f"{path}:[{i}]", rec) for i, rec in enumerate(data)]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _split_tags(text: str) -> list[dict[str, Any]]:
    """'<image>\\nWhat?' -> [{type: image}, {type: text, text: '\\nWhat?'}], text kept byte for byte."""
    parts = []
    for piece in _TAG_SPLIT.split(text):
        if piece == IMAGE_TAG:
            parts.append({"type": "image"})
        elif piece == VIDEO_TAG:
            parts.append({"type": "video"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _turns(record: dict, where: str) -> list[tuple[str, str]]:
    if "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    else:
        raise SampleError(f"{where}: no 'conversations' or 'messages' key (keys: {sorted(record)})")
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"{where}: empty conversation")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise SampleError(f"{where}: turn {i} needs {role_key!r} and {text_key!r}")
        role = _ROLE_OF.get(turn[role_key])
        if role is None:
            raise SampleError(f"{where}: turn {i} has unknown role {turn[role_key]!r} (expected one of {sorted(_ROLE_OF)})")
        text = turn[text_key]
        if not isinstance(text, str):
            raise SampleError(f"{where}: turn {i} content must be a string, got {type(text).__name__}")
        out.append((role, text))
    return out


def record_to_sample(record: Any, where: str, data_path: str | Path) -> Sample:
    """Validate one LLaVA or OpenAI-style record and build its Sample (media paths resolved)."""
    if not isinstance(record, dict):
        raise SampleError(f"{where}: a sample must be a JSON object, got {type(record).__name__}")
    sample_id = str(record.get("id", where))
    where = f"{where} (id {sample_id})"
    if "video" in record:
        raise SampleError(f"{where}: video samples are not supported yet")
    images = [Path(data_path) / p for p in _as_list(record.get("image"))]
    turns = _turns(record, where)
    if turns[-1][0] != "assistant":
        raise SampleError(f"{where}: conversation ends on a {turns[-1][0]} turn; the last turn must be the answer")

    messages = []
    n_tags = 0
    for i, (role, text) in enumerate(turns):
        tags = text.count(IMAGE_TAG) + text.count(VIDEO_TAG)
        if tags and role == "assistant":
            raise SampleError(f"{where}: turn {i} is an answer containing a media tag; tags belong in user turns")
        n_tags += tags
        messages.append({"role": role, "content": _split_tags(text) if tags else text})
    if n_tags != len(images):
        raise SampleError(f"{where}: {n_tags} <image> tag(s) but {len(images)} image(s)")
    return Sample(id=sample_id, messages=messages, images=images, source=where.split(" (id ")[0])


def load_samples(annotation: str | Path, data_path: str | Path | None = None) -> list[Sample]:
    """All samples of one annotation file; media paths are relative to `data_path` (default: its folder)."""
    annotation = Path(annotation)
    base = Path(data_path) if data_path is not None else annotation.parent
    samples = [record_to_sample(rec, where, base) for where, rec in read_records(annotation)]
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise SampleError(f"{s.where}: duplicated id, first seen at {seen[s.id]}")
        seen[s.id] = s.source
    return samples
