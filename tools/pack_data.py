"""Pack an annotation file into fixed-length bins for `data_packing: true` (the same as `vltune pack`).

    python tools/pack_data.py data/train.jsonl --pack-length 4096 --model recipes/my_recipe.yaml
    python tools/pack_data.py data/train.jsonl --pack-length 8192 --model /models/Qwen2.5-VL-7B-Instruct

Counts every sample's tokens as training will (data/pack_annotation.py), caches the counts, packs
with best-fit decreasing, writes `<stem>_packed<N>.json` beside the annotation and prints a JSON
summary (efficiency, bins, samples, oversize, seconds) as its last line.
"""

from __future__ import annotations

import sys

from vltune.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
