#!/usr/bin/env bash
# Qwen3.5 on the lent GPU machine: the Gated DeltaNet check (tools/gpu/gdn_check.py) and `vltune bench`
# runs of the Qwen3.5 shapes, each JSON into $OUT/bench.tar.gz (unpack into docs/bench/). Carried wheels (.whl/):
# transformers 5.23.0, fla-core 0.6.0, torchao 0.18.0 (tools/gpu/env.sh installs them).
# Usage (repo root): bash tools/gpu/qwen3_5.sh check | bench2b | bench9b-cut | bench9b-cut4 | bench9b-cut8-master | bench9b-full | bench9b-full-rows | bench9b-full-master | bench9b-full-gc1 | bench9b-full-gc2 | bench9b-full-nogc | moe | moe-full | curve
# bench9b-full-gc1 / -gc2 / -nogc: the same steps (32 samples, 8 rows each) recomputing every layer, every
# second one and none: compare them within one call. gc1 peaked at 59 GiB on an H100 (2026-12-07, as
# bench9b-full-rows); nogc likely needs an H200's 139 GiB (run(..., needs_h200=true)). Each run gets LIMIT
# seconds (420): give LIMIT=270 for two runs in one 600 s call.
set -uo pipefail
source tools/gpu/env.sh
trap 'bundle_out bench' EXIT   # also after a failed step or a TERM from a time-out (not a KILL)
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { timeout "${LIMIT:-420}" python3 -m vltune.cli bench "$@" --out "$OUT/bench" 2>&1 | grep -v -i warn | tail -4; }
for what in "$@"; do
  echo "== $what"
  case $what in
    check) timeout 300 python3 tools/gpu/gdn_check.py 2>&1 | grep -v -i warn | tail -60 ;;
    bench2b) bench --model-shape qwen3_5-2b --steps 8 --warmup 2 ;;
    bench2b-compile) bench --model-shape qwen3_5-2b --steps 10 --warmup 6 --torch-compile --name qwen3_5-2b-compile ;;
    bench9b-cut) bench --model-shape qwen3_5-9b --layers 8 --steps 6 --warmup 2 --name qwen3_5-9b-8layers ;;
    bench9b-cut4) bench --model-shape qwen3_5-9b --layers 4 --steps 6 --warmup 2 --name qwen3_5-9b-4layers ;;
    bench9b-full-rows) bench --model-shape qwen3_5-9b --no-stock --pure-bf16 --optim adamw_torch_8bit --gradient-checkpointing \
                    --samples-per-step 16 --rows-per-step 4 --steps 3 --warmup 1 --name qwen3_5-9b-full-1gpu-rows4 ;;
    bench9b-full-master) bench --model-shape qwen3_5-9b --no-stock --bf16-master-weights --optim adamw_torch_8bit --gradient-checkpointing \
                    --samples-per-step 16 --rows-per-step 4 --steps 3 --warmup 1 --name qwen3_5-9b-full-1gpu-master-rows4 ;;
    bench9b-cut8-master) bench --model-shape qwen3_5-9b --layers 8 --samples-per-step 8 --rows-per-step 2 --bf16-master-weights \
                    --steps 4 --warmup 1 --name qwen3_5-9b-8layers-sps8-master ;;
    bench9b-full-gc1|bench9b-full-gc2|bench9b-full-nogc)  # the same steps, only the recompute differs
      gc=${what#bench9b-full-}; gc_flag=(); [ "$gc" = nogc ] || gc_flag=(--gradient-checkpointing "${gc#gc}")
      bench --model-shape qwen3_5-9b --no-stock --pure-bf16 --optim adamw_torch_8bit "${gc_flag[@]}" \
            --samples-per-step 32 --rows-per-step 8 --steps 2 --warmup 1 --name "qwen3_5-9b-full-1gpu-rows8-$gc" ;;
    bench9b-full) bench --model-shape qwen3_5-9b --no-stock --pure-bf16 --optim adamw_torch_8bit --gradient-checkpointing \
                    --steps 6 --warmup 2 --name qwen3_5-9b-full-1gpu ;;
    moe) bench --model-shape qwen3_5-35b-a3b --layers 10 --train-type lora --steps 6 --warmup 2 --name qwen3_5-35b-a3b-10layers-lora ;;
    moe-full) bench --model-shape qwen3_5-35b-a3b --layers 4 --samples-per-step 8 --rows-per-step 2 --bf16-master-weights \
                    --steps 4 --warmup 1 --name qwen3_5-35b-a3b-4layers-full-sps8-master ;;
    curve) bench --model-shape qwen3_5-2b --layers 8 --match-steps --steps 50 --warmup 2 --learning-rate 1e-4 --name qwen3_5-2b-8layers-loss50 ;;
    *) echo "unknown run $what" ;;
  esac
done
