#!/usr/bin/env bash
# Run on the lent GPU machine: `vltune bench` for the given shapes (default qwen2_5_vl-3b); the JSON
# files and the table land in $OUT/bench (copy them into docs/bench/).
# Usage (repo root): bash tools/gpu/bench.sh [SHAPE ...]
set -uo pipefail
source tools/gpu/env.sh
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for shape in "${@:-qwen2_5_vl-3b}"; do
  python3 -m vltune.cli bench --model-shape "$shape" --steps 15 --warmup 5 --out "$OUT/bench" 2>&1 | grep -v Warning | tail -3
done
