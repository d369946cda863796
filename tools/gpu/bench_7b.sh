#!/usr/bin/env bash
# Run on the lent GPU machine (one H100 80GB): the 7B items of issue 12.
#  1. 7B LoRA: stock (peft on a bf16 base, padded batches) vs vltune (pure_bf16 base, packed rows);
#  2. 7B full fine-tune on one GPU, vltune alone (the stock fp32 + AdamW path needs ~130 GB):
#     pure_bf16 + torchao 8-bit AdamW + gradient checkpointing.
# JSON files and the table land in $OUT/bench.
# Usage (repo root): bash tools/gpu/bench_7b.sh [lora] [full]
set -uo pipefail
source tools/gpu/env.sh
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench() { python3 -m vltune.cli bench --out "$OUT/bench" "$@" 2>&1 | grep -v -i warn | tail -4; }
items=("$@"); [ ${#items[@]} -eq 0 ] && items=(lora full)
for item in "${items[@]}"; do
  case $item in
    lora) bench --model-shape qwen2_5_vl-7b --train-type lora --pure-bf16 --steps 15 --warmup 5 ;;
    full) bench --model-shape qwen2_5_vl-7b --no-stock --pure-bf16 --optim adamw_torch_8bit --gradient-checkpointing \
            --steps 10 --warmup 3 --name qwen2_5_vl-7b-full-1gpu ;;
  esac
done
