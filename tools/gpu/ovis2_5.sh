#!/usr/bin/env bash
# Ovis2.5 on the lent GPU machine: transformers' own Ovis2_5Processor against data/ (it needs torchvision,
# which the GPU image has) and `vltune bench` runs of the Ovis2.5 shapes, each JSON into $OUT (copy them
# into docs/bench/). Carried wheels (.whl/): transformers 5.25.0 (5.23 has no ovis2_5) and huggingface_hub
# 2.4.0, which it needs (tools/gpu/env.sh installs them).
# Usage (repo root): bash tools/gpu/ovis2_5.sh parity | bench2b | bench9b-cut8 | bench9b-full | bench9b-full-master
set -uo pipefail
source tools/gpu/env.sh
trap 'bundle_out bench' EXIT   # also after a failed step or a TERM from a time-out (not a KILL)
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { timeout "${LIMIT:-420}" python3 -m vltune.cli bench "$@" --out "$OUT/bench" 2>&1 | grep -v -i warn | tail -4; }
for what in "$@"; do
  echo "== $what"
  case $what in
    parity) python3 -m pytest -q -p no:cacheprovider -rs -s tests/unit/data/test_processor_parity.py -k ovis 2>&1 | tail -8
            timeout 300 python3 tools/gpu/parity_ovis_video.py --out "$OUT/parity_ovis_video.json" 2>&1 | tail -8 ;;
    bench2b) bench --model-shape ovis2_5-2b --steps 8 --warmup 2 ;;
    bench9b-cut8) bench --model-shape ovis2_5-9b --layers 8 --steps 6 --warmup 2 --name ovis2_5-9b-8layers ;;
    bench9b-full) bench --model-shape ovis2_5-9b --no-stock --pure-bf16 --optim adamw_torch_8bit --gradient-checkpointing \
                    --steps 6 --warmup 2 --name ovis2_5-9b-full-1gpu ;;
    bench9b-full-master) bench --model-shape ovis2_5-9b --no-stock --bf16-master-weights --optim adamw_torch_8bit \
                    --gradient-checkpointing --steps 6 --warmup 2 --name ovis2_5-9b-full-1gpu-master ;;
    *) echo "unknown run $what" ;;
  esac
done
