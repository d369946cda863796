"""LLaVA-Instruct-150K-style JSON (COCO file names) -> a vltune annotation file with its data path.

    python tools/llava_to_mllm.py --input llava_instruct_150k.json --image-dir /data/coco/train2017 \\
        --out /data/llava/llava_instruct.jsonl [--name llava_instruct] [--registry datasets.json] \\
        [--report problems.jsonl] [--strict]

Each input record `{"id", "image": "000000033471.jpg", "conversations": [{"from", "value"}, ...]}` becomes
one JSONL line in vltune's LLaVA format, its `image` relative to the data path `--image-dir`. Use it with
`dataset_use: NAME` after `--registry` has added `{NAME: {annotation_path, data_path}}` to a registry
file (the recipe's `dataset_registry`), or with a `datasets:` block holding the same entry.

Nothing is dropped silently. A record whose image is missing, or that vltune could not train on (no
answer, an `<image>` tag count that does not match its images, ...), is left out and reported: counts in
the summary (the last stdout line, JSON), the first few on stderr, every one in `--report`. `--strict`
exits 1 when any record was left out. The 150K file reuses a COCO image id for several conversations,
and vltune needs unique ids, so repeats get `-1`, `-2`, ... suffixes (counted as `renamed_ids`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vltune.data.formats import SampleError, record_to_sample

SHOWN_ON_STDERR = 10


@dataclass
class Conversion:
    """Records to write and the ones left out, each as `{"id", "image", "reason"}`."""

    records: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)
    renamed_ids: int = 0


def read_input(path: Path) -> list[Any]:
    """A JSON list (LLaVA's release) or JSONL."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def _images(record: dict) -> list[str]:
    """The record's image names, from `image` (LLaVA) or `images`."""
    names = []
    for key in ("image", "images"):
        value = record.get(key)
        names += [] if value is None else list(value) if isinstance(value, list) else [value]
    return names


def _unique_id(raw: str, seen: Counter) -> str:
    """The id itself the first time, then `id-1`, `id-2`, ... (never colliding with a later real id)."""
    new = raw
    while new in seen:
        new = f"{raw}-{seen[raw]}"
        seen[raw] += 1
    seen[new] += 1
    return new


def convert_records(raw_records: list[Any], image_dir: Path, source: str = "input") -> Conversion:
    """Check every record against vltune's reader and the image folder; build the output records."""
    out = Conversion()
    seen: Counter = Counter()
    for i, record in enumerate(raw_records):
        where = f"{source}:[{i}]"
        try:
            record_to_sample(record, where, image_dir)
        except SampleError as e:
            out.invalid.append({"id": str(record.get("id", where)) if isinstance(record, dict) else where,
                                "image": _images(record) if isinstance(record, dict) else [], "reason": str(e)})
            continue
        images = _images(record)
        absent = [p for p in images if not (image_dir / p).is_file()]
        if absent:
            out.missing.append({"id": str(record.get("id", where)), "image": absent, "reason": "image not found"})
            continue
        raw_id = str(record.get("id", i))
        new_id = _unique_id(raw_id, seen)
        out.renamed_ids += new_id != raw_id
        converted = {"id": new_id, **({"image": images[0] if len(images) == 1 else images} if images else {}),
                     "conversations": record["conversations"] if "conversations" in record else record["messages"]}
        out.records.append(converted)
    return out


def write_annotation(records: list[dict], out: Path) -> None:
    """JSONL (or a JSON list for a .json name), written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)


def merge_registry(registry: Path, name: str, entry: dict[str, str]) -> None:
    """Add or replace `name` in a JSON dataset registry (YAML ones are left to the user: comments)."""
    if registry.suffix != ".json":
        raise SystemExit(f"--registry {registry}: only .json registry files are updated; add the printed entry by hand")
    current = json.loads(registry.read_text()) if registry.exists() else {}
    if not isinstance(current, dict):
        raise SystemExit(f"--registry {registry}: expected a JSON object of name -> entry")
    current[name] = entry
    registry.write_text(json.dumps(current, indent=2) + "\n")


def report(conv: Conversion, image_dir: Path, report_path: Path | None) -> None:
    """The left-out records: the first few on stderr, all of them in `report_path`."""
    left_out = conv.missing + conv.invalid
    for item in left_out[:SHOWN_ON_STDERR]:
        print(f"left out id {item['id']}: {item['reason']} {item['image'] if item['image'] else ''}".rstrip(),
              file=sys.stderr)
    if len(left_out) > SHOWN_ON_STDERR:
        more = f" (all in {report_path})" if report_path else " (--report FILE lists them all)"
        print(f"... and {len(left_out) - SHOWN_ON_STDERR} more{more}", file=sys.stderr)
    if conv.missing and not any("image" in r for r in conv.records):
        print(f"none of the images were found under {image_dir}; LLaVA-Instruct-150K names COCO train2017 "
              "files (000000033471.jpg): point --image-dir at the train2017 folder", file=sys.stderr)
    if report_path:
        report_path.write_text("".join(json.dumps(item) + "\n" for item in left_out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="LLaVA-Instruct JSON list or JSONL")
    parser.add_argument("--image-dir", required=True, type=Path, help="the folder the image names are relative to")
    parser.add_argument("--out", required=True, type=Path, help="annotation file to write (.jsonl or .json)")
    parser.add_argument("--name", help="dataset name for the registry entry (default: --out's stem)")
    parser.add_argument("--registry", type=Path, help="JSON dataset registry to add the entry to")
    parser.add_argument("--report", type=Path, help="write every left-out record here (JSONL: id, image, reason)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any record is left out")
    args = parser.parse_args(argv)

    if not args.image_dir.is_dir():
        print(f"--image-dir {args.image_dir}: not a directory", file=sys.stderr)
        return 1
    conv = convert_records(read_input(args.input), args.image_dir, str(args.input))
    report(conv, args.image_dir, args.report)
    if not conv.records:
        print(f"{args.input}: no record could be converted; nothing written", file=sys.stderr)
        return 1
    write_annotation(conv.records, args.out)
    name = args.name or args.out.stem
    entry = {"annotation_path": str(args.out.resolve()), "data_path": str(args.image_dir.resolve())}
    if args.registry:
        merge_registry(args.registry, name, entry)
    print(json.dumps({"name": name, **entry, "written": len(conv.records), "missing_images": len(conv.missing),
                      "invalid": len(conv.invalid), "renamed_ids": conv.renamed_ids}))
    return 1 if args.strict and (conv.missing or conv.invalid) else 0


if __name__ == "__main__":
    sys.exit(main())
