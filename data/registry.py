"""`dataset_use` -> samples: registered names, direct annotation paths and HF `datasets` directories.

Syntax (qwen-vl-finetune's, extended the way ms-swift users expect):

* `a%50,b`            dataset `a` sampled to 50% (seeded: the same recipe picks the same samples), all of `b`;
                      a percentage that rounds a small dataset down to 0 samples keeps 1, and says so
* `path/to/x.jsonl`   a direct JSON/JSONL path; its folder is the data path
* `name`              an entry `{annotation_path, data_path}` of the recipe's `datasets` block or of the
                      `dataset_registry` file (YAML or JSON; relative paths are relative to that file)
* `dir[train:1000,test:100]`  an HF `datasets` directory (`save_to_disk` output, or a folder of parquet
                      files): the first 1000 rows of split train and the first 100 of split test;
                      `dir[train]` is the whole split, `dir` every split

A file that cannot be read at all (missing, not UTF-8, not a JSON list) is a DatasetSpecError naming it,
even with skip_bad_samples: skipping is for bad samples, not for a whole dataset gone.

HF rows hold the same fields as a JSON record; image columns may hold paths or encoded images
(`datasets.Image` cells are read undecoded, as bytes, and decoded by data/vision.py like any file).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .formats import ReadResult, SampleError, read_annotation, samples_from_records

_ENTRY = re.compile(r"^(?P<name>[^\[%]+?)(?:\[(?P<slices>[^\]]*)\])?(?:%(?P<rate>[0-9.]+))?$")


class DatasetSpecError(ValueError):
    """A `dataset_use` entry that names nothing readable; the message says which and why."""


@dataclass(frozen=True)
class DatasetUse:
    """One parsed `dataset_use` entry."""

    name: str
    rate: float = 1.0
    slices: tuple[tuple[str, int | None], ...] = ()
    """(split, first N rows or None for all) for HF directories."""


def split_entries(spec: str) -> list[str]:
    """Split on commas that are not inside `[...]`."""
    entries, depth, current = [], 0, ""
    for ch in spec:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            entries.append(current.strip())
            current = ""
        else:
            current += ch
    entries.append(current.strip())
    return [e for e in entries if e]


def parse_entry(entry: str) -> DatasetUse:
    m = _ENTRY.match(entry.strip())
    if not m:
        raise DatasetSpecError(f"dataset_use entry {entry!r}: expected NAME, NAME%PERCENT or DIR[split:N,...]")
    rate = 1.0
    if m["rate"] is not None:
        rate = float(m["rate"]) / 100
        if not 0 < rate <= 1:
            raise DatasetSpecError(f"dataset_use entry {entry!r}: the sampling percentage must be in (0, 100]")
    slices = []
    for part in filter(None, (p.strip() for p in (m["slices"] or "").split(","))):
        split, _, count = part.partition(":")
        if count and not count.isdigit():
            raise DatasetSpecError(f"dataset_use entry {entry!r}: slice {part!r} must be SPLIT or SPLIT:N")
        slices.append((split, int(count) if count else None))
    return DatasetUse(m["name"].strip(), rate, tuple(slices))


def load_registry(recipe_datasets: dict | None, registry_file: str | None) -> dict[str, dict[str, str]]:
    """name -> {annotation_path, data_path}, from the registry file and then the recipe (recipe wins)."""
    registry: dict[str, dict[str, str]] = {}
    if registry_file:
        path = Path(registry_file)
        if not path.exists():
            raise DatasetSpecError(f"dataset_registry {registry_file!r} does not exist")
        loaded = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
        if not isinstance(loaded, dict):
            raise DatasetSpecError(f"dataset_registry {registry_file}: expected a mapping of names to entries")
        for name, entry in loaded.items():
            registry[name] = _entry(name, entry, base=path.parent)
    for name, entry in (recipe_datasets or {}).items():
        registry[name] = _entry(name, entry, base=Path("."))
    return registry


def _entry(name: str, entry: Any, base: Path) -> dict[str, str]:
    if not isinstance(entry, dict) or "annotation_path" not in entry:
        raise DatasetSpecError(f"dataset {name!r}: an entry needs annotation_path (and optionally data_path), got {entry!r}")
    unknown = set(entry) - {"annotation_path", "data_path"}
    if unknown:
        raise DatasetSpecError(f"dataset {name!r}: unknown key(s) {sorted(unknown)} (expected annotation_path, data_path)")
    annotation = base / entry["annotation_path"]
    data_path = base / entry["data_path"] if entry.get("data_path") else annotation.parent
    return {"annotation_path": str(annotation), "data_path": str(data_path)}


def _is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (
        any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
        or any(path.rglob("*.parquet"))
    )


def _read_hf(path: Path, use: DatasetUse) -> ReadResult:
    """Rows of an HF datasets directory as samples (media paths relative to the directory)."""
    import datasets  # optional, heavy: only when a directory is named

    if any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path))
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    wanted = use.slices or tuple((name, None) for name in splits)
    items = []
    for split, count in wanted:
        if split not in splits:
            raise DatasetSpecError(f"{path}: no split {split!r} (splits: {sorted(splits)})")
        table = splits[split]
        for column, feature in table.features.items():
            if isinstance(feature, datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
            elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
                table = table.cast_column(column, datasets.List(datasets.Image(decode=False)))
        n = len(table) if count is None else min(count, len(table))
        items += [(f"{path}[{split}][{i}]", table[i], None) for i in range(n)]
    return samples_from_records(items, path)


def read_one(use: DatasetUse, registry: dict[str, dict[str, str]]) -> ReadResult:
    if use.name in registry:
        entry = registry[use.name]
        return read_annotation(entry["annotation_path"], entry["data_path"])
    path = Path(use.name)
    if _is_hf_directory(path):
        return _read_hf(path, use)
    if use.slices:
        raise DatasetSpecError(f"dataset_use entry {use.name!r}: [split:N] slices apply to HF datasets directories only")
    if path.suffix in (".json", ".jsonl"):
        return read_annotation(path)
    known = f" (registered: {', '.join(sorted(registry))})" if registry else ""
    raise DatasetSpecError(
        f"dataset_use entry {use.name!r}: not a registered name{known}, a .json/.jsonl file or an HF datasets directory"
    )


def sample_count(n: int, rate: float, entry: str) -> int:
    """How many of `n` samples `entry`'s rate keeps: rounded down, but at least one (with a printed note)."""
    # The epsilon undoes float error (100 samples at 29%: 100 * 0.29 = 28.999999999999996); percentages
    # with up to 3 decimals land at least 1e-5 away from the next integer, far above it.
    count = int(n * rate + 1e-6)
    if count == 0 and n:
        print(f"[vltune] dataset_use entry {entry!r}: {rate * 100:g}% of {n} sample(s) rounds down to 0; keeping 1", flush=True)
        return 1
    return count


def read_dataset_use(spec: str, registry: dict[str, dict[str, str]] | None = None, seed: int = 42) -> ReadResult:
    """Every sample of every `dataset_use` entry, in order, each entry sampled to its rate (seeded)."""
    out = ReadResult()
    for i, entry in enumerate(split_entries(spec)):
        use = parse_entry(entry)
        try:
            result = read_one(use, registry or {})
        except SampleError as e:  # a whole file unreadable (missing, not UTF-8, not a list): not a bad sample
            fix = "fix the path" if e.kind == "missing_file" else "fix the file"
            raise DatasetSpecError(
                f"dataset entry {entry!r}: {e}; {fix} or remove the entry (skip_bad_samples skips samples, not files)"
            ) from None
        if use.rate < 1:
            count = sample_count(len(result.samples), use.rate, entry)
            keep = sorted(random.Random(f"{seed}:{i}:{use.name}").sample(range(len(result.samples)), count))
            result.samples = [result.samples[k] for k in keep]
        out.extend(result)
    return out
