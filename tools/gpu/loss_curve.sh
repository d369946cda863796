#!/usr/bin/env bash
# Run on the lent GPU machine: issue 12's "speed must not change the math" check. Both paths start from
# the same init and take 50 optimizer steps over the same samples (vltune packs each stock micro-batch
# into its own rows, --match-steps); the report's loss_max_rel_diff is the largest per-step difference.
# Usage (repo root): bash tools/gpu/loss_curve.sh [SHAPE] [extra bench flags]
set -uo pipefail
source tools/gpu/env.sh
mkdir -p "$OUT/bench"
shape=${1:-qwen2_5_vl-3b}
python3 -m vltune.cli bench --model-shape "$shape" --match-steps --steps 50 --warmup 0 --out "$OUT/bench" \
  --name "$shape-loss50" "${@:2}" 2>&1 | grep -v -i warn | tail -4
