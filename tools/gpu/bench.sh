#!/usr/bin/env bash
# Run on the lent GPU machine: `vltune bench` for the given shapes (default qwen2_5_vl-3b); the JSON
# files and the table land in $OUT/bench (copy them into docs/bench/).
# Usage (repo root): bash tools/gpu/bench.sh [SHAPE ...]
set -uo pipefail
OUT=${OUT:-/tmp/vltune-gpu}
mkdir -p "$OUT/bench" /tmp/pkg
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
ln -sfn "$PWD" /tmp/pkg/vltune
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for shape in "${@:-qwen2_5_vl-3b}"; do
  python3 -m vltune.cli bench --model-shape "$shape" --steps 15 --warmup 5 --out "$OUT/bench" 2>&1 | grep -v Warning | tail -3
done
