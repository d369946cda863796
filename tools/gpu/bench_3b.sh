#!/usr/bin/env bash
# Run on the lent GPU machine (one H100 80GB): the 3B full fine-tune items of issue 12 (docs/performance.md).
#  probe    speed_probe: the step with the zero-padded vision MLP (default) against the released 3420 width,
#           broken down part by part (vision forward, forward + backward, clip + AdamW) and profiled;
#  ga       vltune bench, eager, one optimizer step per SPS samples on both paths (stock accumulates
#           padded micro-batches of one: micro-batches of two with accumulation run out of memory on 80 GB);
#  ga_compile  the same with --torch-compile (a longer warm-up: compile recompiles per length range).
# JSON files and the table land in $OUT/bench (bench) and $OUT (probe).
# Usage (repo root): [SPS=16 STEPS=8 WARM=8 SAMPLES=60 WARM_SAMPLES=12] bash tools/gpu/bench_3b.sh probe ga ga_compile
set -uo pipefail
source tools/gpu/env.sh
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SPS=${SPS:-16}
bench() { python3 -m vltune.cli bench --out "$OUT/bench" "$@" 2>&1 | grep -v -i warn | tail -4; }
for item in "$@"; do
  case $item in
    probe) python3 tools/gpu/speed_probe.py --shape qwen2_5_vl-3b --variants chunked,unaligned --profile chunked,unaligned \
             --samples "${SAMPLES:-60}" --warmup-samples "${WARM_SAMPLES:-12}" 2>&1 | grep -v -i warn | tail -8 ;;
    ga) bench --model-shape qwen2_5_vl-3b --samples-per-step "$SPS" --batch-size 1 --steps 8 --warmup 3 --name "qwen2_5_vl-3b-sps$SPS" ;;
    ga_compile) bench --model-shape qwen2_5_vl-3b --samples-per-step "$SPS" --batch-size 1 --torch-compile --steps "${STEPS:-8}" --warmup "${WARM:-8}" \
                  --name "qwen2_5_vl-3b-sps$SPS-compile" ;;
  esac
done
