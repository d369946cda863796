"""The data set of tools/gpu/train_speed.py (LLaVA records: `conversations` + `image`) in the peers' format.

Both ms-swift and LLaMA-Factory read OpenAI-style `messages` with `<image>` tags and an `images` list;
LLaMA-Factory also wants a dataset_info.json naming the file and its columns. The records, their order
and their JPEG files are the ones vltune trains on; image paths become absolute.

    python tools/peers/data.py DIR    # DIR/data/train.jsonl -> DIR/peers/{messages.jsonl,dataset_info.json}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROLES = {"human": "user", "gpt": "assistant"}


def to_messages(record: dict, image_dir: Path) -> dict:
    out = {"messages": [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]}
    if "image" in record:
        out["images"] = [str((image_dir / record["image"]).resolve())]
    return out


def main(root: Path) -> None:
    source = root / "data" / "train.jsonl"
    out = root / "peers"
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    (out / "messages.jsonl").write_text("".join(json.dumps(to_messages(r, source.parent)) + "\n" for r in records))
    info = {"vltune_bench": {
        "file_name": "messages.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"[peers] {len(records)} records -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
