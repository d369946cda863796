"""`vltune pack` / tools/pack_data.py: count every sample's tokens exactly as training will, pack the
samples into fixed-length bins (best-fit decreasing), and write a packed annotation file.

The count is the training count: the same SFTDataset (tokenizer, chat template, media placeholders)
with the recipe's pixel limits, video settings, model_max_length and truncation_strategy; images are
sized from their headers (`tokens(decode=False)`), videos are decoded (their frame sampling sets the
count). Counts are cached per record, keyed by the record's JSON, its media files' size and mtime and
every setting that changes a count (model files included), so re-packing at another length, or
after appending records, counts only what is new.

The output is a JSON list of packs, each a list of the original records, verbatim: data/formats.py
reads it back with each sample's pack index, and `data_packing: true` trains one pack per row.
Media paths stay relative to the annotation's folder, which is where the output goes by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import RecipeConfig
from .dataset import SFTDataset
from .formats import SampleError, read_records, samples_from_records
from .packing import best_fit_decreasing
from .prepare import video_overrides
from .vision import is_url

CACHE_VERSION = 1
MODEL_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
)
"""The model directory's files that decide a token count."""
NO_LIMIT = 1 << 40
_PACKED_SUFFIX = re.compile(r"_packed\d+$")


@dataclass(frozen=True)
class CountSettings:
    """Everything besides the record itself that changes its token count."""

    model_dir: str
    min_pixels: int | None = None
    max_pixels: int | None = None
    video: dict = field(default_factory=dict)
    max_length: int = NO_LIMIT
    """model_max_length of the recipe (NO_LIMIT for a bare model directory: raw counts)."""
    truncation: str = "error"

    def key(self) -> str:
        """A digest of the settings and of the model files' contents."""
        h = hashlib.sha256(json.dumps({**asdict(self), "v": CACHE_VERSION}, sort_keys=True, default=str).encode())
        for name in MODEL_FILES:
            path = Path(self.model_dir) / name
            if path.exists():
                h.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()[:20]


def settings_from_recipe(cfg: RecipeConfig) -> CountSettings:
    """The counting settings training uses for `cfg` (data/prepare.build_dataset's SFTDataset arguments)."""
    d = cfg.data
    return CountSettings(
        model_dir=str(cfg.model.model_name_or_path), min_pixels=d.min_pixels, max_pixels=d.max_pixels,
        video={k: v for k, v in video_overrides(cfg).items() if v is not None},
        max_length=d.model_max_length, truncation=d.truncation_strategy,
    )


@dataclass
class CountResult:
    """Per good record: (where, record, tokens); the records that cannot train; how many came from the cache."""

    counted: list[tuple[str, Any, int]] = field(default_factory=list)
    errors: list[SampleError] = field(default_factory=list)
    dropped: list[SampleError] = field(default_factory=list)
    """Longer than model_max_length under truncation_strategy delete: training drops them too."""
    cached: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vltune" / "token_counts"


def _record_key(record: Any, media: list) -> str:
    h = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    for ref in media:
        if isinstance(ref, bytes):
            h.update(hashlib.sha256(ref).digest())
        elif is_url(ref):  # fetched once into the URL cache: the URL names the content (os.stat would miss it)
            h.update(f"url:{ref}".encode())
        else:
            try:
                st = os.stat(ref)
                h.update(f"{ref}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{ref}:missing".encode())
    return h.hexdigest()[:24]


class CountCache:
    """{record key: tokens | [error kind, message]} in one JSON file per CountSettings.key()."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, Any] = {}
        self.dirty = False
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a broken cache is only a slower run

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)


def count_tokens(
    annotation: str | Path,
    settings: CountSettings,
    *,
    data_path: str | Path | None = None,
    cache_dir: Path | None = None,
    progress: Callable | None = None,
) -> CountResult:
    """The training token count of every record of `annotation` (JSON, JSONL or an already packed file)."""
    annotation = Path(annotation)
    records = read_records(annotation)
    read = samples_from_records(records.items, data_path if data_path is not None else annotation.parent)
    out = CountResult(errors=records.problems + read.problems)
    by_where = {where: record for where, record, _ in records.items}
    dataset = SFTDataset(
        read.samples, settings.model_dir, max_length=settings.max_length, min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels, truncation=settings.truncation, video_overrides=settings.video,
    )
    cache = CountCache(cache_dir / f"{settings.key()}.json" if cache_dir is not None else None)
    indices = range(len(dataset))
    for i in progress(indices) if progress else indices:
        sample = dataset.samples[i]
        record = by_where[sample.source]
        key = _record_key(record, list(sample.images) + list(sample.videos))
        value = cache.get(key)
        if value is None:
            try:
                value = dataset.check(i, decode=False)[0]
            except SampleError as e:
                value = [e.kind, str(e)]
            cache.put(key, value)
        else:
            out.cached += 1
        if isinstance(value, int):
            out.counted.append((sample.source, record, value))
        else:
            error = SampleError(value[1], value[0])
            dropped = error.kind == "too_long" and settings.truncation != "error"
            (out.dropped if dropped else out.errors).append(error)
    cache.save()
    return out


def packed_output_path(annotation: str | Path, pack_length: int, output: str | Path | None = None) -> Path:
    """Where the packed file goes: `--output` (".json" added when it has no suffix), else
    `<stem>_packed<N>.json` beside the annotation, with no doubled suffixes (`a.jsonl` -> `a_packed4096.json`,
    `a_packed4096.json` re-packed at 2048 -> `a_packed2048.json`)."""
    if output is not None:
        output = Path(output)
        if output.suffix == ".jsonl":
            raise ValueError(f"--output {output}: a packed file is a JSON list of packs; name it .json")
        return output if output.suffix == ".json" else output.with_name(output.name + ".json")
    annotation = Path(annotation)
    stem = _PACKED_SUFFIX.sub("", annotation.name.removesuffix(".jsonl").removesuffix(".json"))
    return annotation.with_name(f"{stem}_packed{pack_length}.json")


def pack_annotation(
    annotation: str | Path,
    pack_length: int,
    settings: CountSettings,
    *,
    output: str | Path | None = None,
    data_path: str | Path | None = None,
    cache_dir: Path | None = None,
    skip_bad_samples: bool = False,
    progress: Callable | None = None,
) -> tuple[dict, CountResult]:
    """Count, pack and write; returns the summary (efficiency, bins, samples, oversize, seconds, ...) and the counts.

    Records that cannot train are errors: nothing is written (the summary says `written: false`) unless
    `skip_bad_samples`, which leaves them out and counts them. Over-long records under
    truncation_strategy delete are left out and counted, as training would drop them.
    """
    start = time.perf_counter()
    if pack_length <= 0:
        raise ValueError(f"--pack-length must be positive, got {pack_length}")
    out_path = packed_output_path(annotation, pack_length, output)
    counts = count_tokens(annotation, settings, data_path=data_path, cache_dir=cache_dir, progress=progress)
    lengths = [n for _, _, n in counts.counted]
    packing = best_fit_decreasing(lengths, pack_length)
    write = skip_bad_samples or not counts.errors
    if write:
        packs = [[counts.counted[i][1] for i in b] for b in packing.bins]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(packs, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    media_root = Path(data_path) if data_path is not None else Path(annotation).parent
    summary = {
        "output": str(out_path),
        "written": write,
        "efficiency": round(packing.efficiency, 4),
        "bins": len(packing.bins),
        "samples": len(lengths),
        "oversize": len(packing.oversize),
        "tokens": int(sum(lengths)),
        "pack_length": pack_length,
        "errors": len(counts.errors),
        "dropped": len(counts.dropped),
        "cached": counts.cached,
        "data_path": str(media_root.resolve()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return summary, counts
