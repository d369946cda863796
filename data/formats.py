"""Readers for annotation files, turning each record into one chat `Sample`.

Formats: LLaVA/ShareGPT `conversations` (from human/gpt/system) and OpenAI `messages` (role/content,
content a string with `<image>`/`<video>` tags or a list of `{type: text|image|video|image_url}` parts),
with the media in `image`/`images` and `video`/`videos` keys (one path or a list) or inline in the parts
(`{"type": "image", "image": "a.jpg"}`, `{"type": "image_url", "image_url": {"url": "..."}}`). A
record-level `system` string (LLaMA-Factory's / ShareGPT's column) is the system prompt. Files: a JSON
list, JSONL, or a packed JSON file (a list of lists, each inner list one pack written by
tools/pack_data.py); the content decides, not the suffix, and a UTF-8 BOM is skipped. Images may also be
raw bytes (HF `datasets` image columns, see data/registry.py, or `data:` base64 URLs) or http(s) URLs,
fetched when the image is loaded (data/vision.py).

Every problem is a `SampleError` with a `kind` (the problem class `vltune data check` counts) and a
message naming the file, the line or index, the sample id and the reason. Readers return the good
samples and the problems side by side, so a caller can stop on the first problem or skip and count.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .vision import is_url

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAG_SPLIT = re.compile(r"(<image>|<video>)")

ImageRef = Union[Path, bytes, str]
"""An image file, the encoded bytes of one (HF datasets keep images inside the arrow files), or an
http(s) URL (a str), fetched by data/vision.py."""


class SampleError(ValueError):
    """A sample that cannot be trained on; the message says which one and why, `kind` names the class."""

    def __init__(self, message: str, kind: str = "invalid_sample"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Sample:
    """One conversation with its media, in the OpenAI message layout the chat templates expect."""

    id: str
    messages: list[dict[str, Any]]
    images: list[ImageRef] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    source: str = ""
    """Where it came from, `file:line`, for error messages."""
    pack: int | None = None
    """Index of the pack this sample belongs to in a packed file (None: not packed)."""

    @property
    def where(self) -> str:
        return f"{self.source} (id {self.id})"


@dataclass
class Records:
    """The records of one annotation file: (`file:line`, record, pack index) triples, and the problems."""

    items: list[tuple[str, Any, int | None]] = field(default_factory=list)
    problems: list[SampleError] = field(default_factory=list)


def _decode_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "malformed_json") from None


def _read_jsonl(path: Path, raw: bytes) -> Records:
    """One record per line; a bad line is a problem of its own and the rest of the file still reads."""
    out = Records()
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.problems.append(SampleError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)", "not_utf8"))
            continue
        if not text.strip():
            continue
        try:
            out.items.append((where, _decode_json(text, where), None))
        except SampleError as e:
            out.problems.append(e)
    return out


def read_records(path: str | Path) -> Records:
    """The records of a JSON list, a packed JSON file (list of lists) or a JSONL file.

    The content decides, not the suffix: a file whose first character is `[` is read as a JSON list
    (a list saved as .jsonl), a .json file of one object per line as JSONL. A UTF-8 byte-order mark
    (Windows editors write one) is skipped. A file that cannot be read at all (missing, not UTF-8,
    malformed JSON list) raises; a bad JSONL line becomes one problem in the result.
    """
    path = Path(path)
    if not path.exists():
        raise SampleError(f"{path}: annotation file does not exist", "missing_file")
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    starts_list = re.match(rb"\s*\[", raw) is not None  # a match, not lstrip(): no copy of the whole file
    if path.suffix == ".jsonl" and not starts_list:
        return _read_jsonl(path, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SampleError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})", "not_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # JSONL: a .jsonl whose first line merely opens with `[`, or a .json of objects that is not one
        # JSON value, whichever of its lines is bad (so its errors are per line, as for a .jsonl).
        if path.suffix == ".jsonl" or re.match(r"\s*\{", text):
            return _read_jsonl(path, raw)
        raise SampleError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})", "malformed_json") from None
    if not isinstance(data, list):
        raise SampleError(
            f"{path}: expected a JSON list of samples (or JSONL, one sample per line), got one {type(data).__name__}; "
            "wrap the samples in [...]", "malformed_json",
        )
    out = Records()
    for i, rec in enumerate(data):
        if isinstance(rec, list):  # a packed file: each element is one pack of samples
            out.items += [(f"{path}:[{i}][{j}]", inner, i) for j, inner in enumerate(rec)]
        else:
            out.items.append((f"{path}:[{i}]", rec, None))
    return out


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


def _media_path(value: Any, where: str) -> Any:
    if isinstance(value, dict):  # HF datasets image cells: {"bytes": ..., "path": ...}; OpenAI's {"url": ...}
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path", value.get("url"))
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise SampleError(f"{where}: a media entry must be a path string, got {value!r}", "invalid_media")
    if value.startswith("data:"):  # data:image/png;base64,.... (OpenAI clients inline images this way)
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise SampleError(f"{where}: a data: URL must be base64 (data:image/...;base64,...), got {header!r}", "invalid_media")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise SampleError(f"{where}: the data: URL's base64 payload is not valid base64", "invalid_media") from None
    return value.removeprefix("file://")


def _parts(content: list, i: int, where: str, inline: dict[str, list]) -> list[dict[str, Any]]:
    """OpenAI content parts -> the template's parts; inline media paths are collected into `inline`."""
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "video", "image_url", "video_url"):  # OpenAI: {"type": "image_url", "image_url": {"url": ...}}
            media = kind.removesuffix("_url")
            if part.get(kind) is not None:
                inline[media].append(_media_path(part[kind], where))
            elif kind.endswith("_url"):
                raise SampleError(f"{where}: turn {i} has an {kind} part without its {kind!r} key: {part!r}", "invalid_media")
            parts.append({"type": media})
        else:
            raise SampleError(
                f"{where}: turn {i} has a content part that is not text/image/video/image_url: {part!r}", "invalid_turn"
            )
    return parts


def _turns(record: dict, where: str, inline: dict[str, list]) -> list[tuple[str, str | list]]:
    if "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    else:
        raise SampleError(f"{where}: no 'conversations' or 'messages' key (keys: {sorted(record)})", "missing_key")
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"{where}: empty conversation", "empty_conversation")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise SampleError(f"{where}: turn {i} needs {role_key!r} and {text_key!r}", "invalid_turn")
        role = _ROLE_OF.get(turn[role_key])
        if role is None:
            raise SampleError(
                f"{where}: turn {i} has unknown role {turn[role_key]!r} (expected one of {sorted(_ROLE_OF)})", "unknown_role"
            )
        content = turn[text_key]
        if isinstance(content, list):
            content = _parts(content, i, where, inline)
        elif not isinstance(content, str):
            raise SampleError(f"{where}: turn {i} content must be a string or a list of parts, got {type(content).__name__}", "invalid_turn")
        out.append((role, content))
    return out


def _count(content: str | list, kind: str) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_TAG if kind == "image" else VIDEO_TAG)
    return sum(part["type"] == kind for part in content)


def _resolve(ref: Any, data_path: Path) -> ImageRef:
    return ref if isinstance(ref, bytes) or is_url(ref) else data_path / ref


def _with_system(record: dict, turns: list[tuple[str, str | list]], where: str) -> list[tuple[str, str | list]]:
    """The record-level `system` string (LLaMA-Factory's / ShareGPT's column) as the first turn.

    A conversation that has its own system turn as well is ambiguous unless both say the same: an error.
    """
    system = record.get("system")
    if system is None or system == "":
        return turns
    if not isinstance(system, str):
        raise SampleError(f"{where}: the 'system' key must be a string, got {type(system).__name__}", "invalid_turn")
    own = [content for role, content in turns if role == "system"]
    if own:
        if own == [system]:
            return turns
        raise SampleError(
            f"{where}: a 'system' key and a system turn in the conversation that differ; keep one of them", "invalid_turn"
        )
    return [("system", system), *turns]


def record_to_sample(record: Any, where: str, data_path: str | Path, pack: int | None = None) -> Sample:
    """Validate one record and build its Sample (media paths resolved against `data_path`)."""
    if not isinstance(record, dict):
        raise SampleError(f"{where}: a sample must be a JSON object, got {type(record).__name__}", "invalid_sample")
    raw_id = record.get("id")
    sample_id = where if raw_id is None or raw_id == "" else str(raw_id)  # "id": null is no id, not the id "None"
    source, where = where, f"{where} (id {sample_id})"
    inline: dict[str, list] = {"image": [], "video": []}
    turns = _with_system(record, _turns(record, where, inline), where)
    if turns[-1][0] != "assistant":
        raise SampleError(f"{where}: conversation ends on a {turns[-1][0]} turn; the last turn must be the answer", "ends_on_user")

    media: dict[str, list] = {}
    for kind in ("image", "video"):
        listed = [_media_path(v, where) for v in _as_list(record.get(kind)) + _as_list(record.get(kind + "s"))]
        if listed and inline[kind]:
            raise SampleError(f"{where}: {kind}s given both in the record's {kind!r} key and inside the messages", "invalid_media")
        media[kind] = listed or inline[kind]
    for video in media["video"]:
        if not isinstance(video, str) or is_url(video):
            got = "a URL" if is_url(video) else "encoded bytes"
            raise SampleError(f"{where}: a video must be a file path, got {got}; download or save it and give its path", "invalid_media")

    messages = []
    for i, (role, content) in enumerate(turns):
        tags = _count(content, "image") + _count(content, "video")
        if tags and role == "assistant":
            raise SampleError(f"{where}: turn {i} is an answer containing a media tag; tags belong in user turns", "tag_in_answer")
        message = {"role": role, "content": content}
        if isinstance(content, str) and tags:
            # `media_inline`: the parts were one text with tags, to be rendered back to back; a template that
            # separates parts (Ovis2.5's, with newlines) keeps the text as written instead (its recipe does)
            message = {"role": role, "content": _split_tags(content), "media_inline": True}
        messages.append(message)
    for kind in ("image", "video"):
        n_tags = sum(_count(m["content"], kind) for m in messages)
        if n_tags != len(media[kind]):
            raise SampleError(f"{where}: {n_tags} <{kind}> tag(s) but {len(media[kind])} {kind}(s)", "tag_count_mismatch")
    base = Path(data_path)
    return Sample(
        id=sample_id, messages=messages, images=[_resolve(r, base) for r in media["image"]],
        videos=[base / v for v in media["video"]], source=source, pack=pack,
    )


@dataclass
class ReadResult:
    """The good samples of one or more sources, and every problem met on the way."""

    samples: list[Sample] = field(default_factory=list)
    problems: list[SampleError] = field(default_factory=list)

    def extend(self, other: "ReadResult") -> None:
        self.samples += other.samples
        self.problems += other.problems

    def raise_first(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problem(s); `vltune data check` lists them all)" if len(self.problems) > 1 else ""
            raise SampleError(f"{self.problems[0]}{more}", self.problems[0].kind)


def samples_from_records(items: list[tuple[str, Any, int | None]], data_path: str | Path) -> ReadResult:
    """Build the samples of (where, record, pack) triples; duplicated ids are problems, first one kept."""
    out = ReadResult()
    seen: dict[str, str] = {}
    for where, record, pack in items:
        try:
            sample = record_to_sample(record, where, data_path, pack)
        except SampleError as e:
            out.problems.append(e)
            continue
        if sample.id in seen:
            out.problems.append(SampleError(f"{sample.where}: duplicated id, first seen at {seen[sample.id]}", "duplicated_id"))
            continue
        seen[sample.id] = sample.source
        out.samples.append(sample)
    return out


def read_annotation(annotation: str | Path, data_path: str | Path | None = None) -> ReadResult:
    """Samples and problems of one annotation file; media paths are relative to `data_path` (default: its folder)."""
    annotation = Path(annotation)
    records = read_records(annotation)
    out = samples_from_records(records.items, data_path if data_path is not None else annotation.parent)
    out.problems = records.problems + out.problems
    return out


def load_samples(annotation: str | Path, data_path: str | Path | None = None) -> list[Sample]:
    """All samples of one annotation file, raising on the first problem (strict reading)."""
    result = read_annotation(annotation, data_path)
    result.raise_first()
    return result.samples
