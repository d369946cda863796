#!/usr/bin/env bash
# Issue 28's scaling runs on the GPUs of one host. One call per item (each fits a 10-minute device call
# at its defaults; knobs below split an item over calls). Usage, repo root on the GPU machine:
#   bash tools/gpu/scaling.sh dp3b           # 3B full FT, packed rows, DDP / FSDP2 / ZeRO-2 at 1, 2, 4, 8 GPUs
#   bash tools/gpu/scaling.sh big            # 7B (BIG_SHAPE=qwen3_vl-8b) FSDP2 + ZeRO-3 on all GPUs, 50 steps, + the 1-GPU run
#   bash tools/gpu/scaling.sh moe            # MoE (MOE_SHAPE=qwen3_5-35b-a3b) FSDP2 + ZeRO-3 + stock transformers FSDP2
#   bash tools/gpu/scaling.sh sp             # one 64k-token video row, sequence_parallel_size 4 and 8, + unsharded
#   DRY=cpu bash tools/gpu/scaling.sh dp3b big moe sp   # CPU dry run: tiny models, gloo, 2 processes, 3-4 steps
# Wheels: run `bash tools/gpu/scaling_wheels.sh` here first (DeepSpeed, pydantic, hjson, PyAV for Python 3.12 into
# .whl-scaling/, 39 MB) and carry [".whl", ".whl-scaling"] (with the repo ~60 MB of the 64 MiB carry limit).
# Every run is `vltune train RECIPE --nproc N --key value ...` as tools/gpu/scaling_worker.py runs it under
# torchrun (the same worker, minus writing the final model). Each run appends one JSON line (command,
# GPU name and count, engine, N, exit status, tokens/s (per GPU), MFU, peak memory per GPU, every step's
# loss, the log tail on failure) to $OUT/scaling/ITEM.jsonl and to $WORK/results/ITEM.jsonl (kept on a
# warm machine across calls); $OUT/scaling/summary.json is tools/gpu/scaling_summary.py's summary of
# every line in $WORK/results (efficiency, loss differences, vltune / stock). A failed run is recorded, not fatal.
# Knobs: GPUS (default: nvidia-smi's count), STEPS (12), WARM (4: steps left out of the averages),
# DP_ENGINES ("ddp fsdp zero2"), DP_COUNTS ("1 2 4 8", only <= GPUS), DP_KEYS, BIG_SHAPE (qwen2_5_vl-7b),
# BIG_ENGINES ("fsdp zero3"; "" for the reference only), BIG_STEPS (50), BIG_N (GPUS), BIG_ACCUM (1), BIG_REF (1: the 1-GPU run),
# BIG_REF_KEYS (the reference's own keys: none on GPUs, DRY "pure_bf16=false optim=adamw_torch"), BIG_KEYS,
# MOE_SHAPE (qwen3_vl-30b-a3b), MOE_ENGINES ("fsdp zero3 stock"), MOE_PURE_BF16 (false; the stock run only),
# MOE_ASSET_DEVICE (cuda; cpu if the bf16 model does not fit one GPU), STOCK_BATCH (4), MOE_KEYS,
# SP_SHAPE (qwen3_vl-8b: 8 KV heads, so 4 and 8 divide them), SP_SIZES ("4 8", <= GPUS), SP_FRAMES (500),
# SP_PX (512), SP_REF (1), SP_KEYS, RUN_TIMEOUT (seconds per run, 900).
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${DRY:-}" = cpu ]; then
  OUT=${OUT:-/tmp/vltune-scaling-dry}; export OUT
  PY=${PY:-.venv/bin/python}; GPUS=${GPUS:-2}; GPU_NAME=cpu; TINY=--tiny
  WORK=${WORK:-/tmp/vltune-scaling-dry-work}
  BIG_REF_KEYS=${BIG_REF_KEYS-pure_bf16=false optim=adamw_torch}
  STEPS=${STEPS:-3}; WARM=${WARM:-1}; BIG_STEPS=${BIG_STEPS:-4}; SP_FRAMES=${SP_FRAMES:-16}; SP_PX=${SP_PX:-128}
  SAMPLES=${SAMPLES:-48}; GPU_MIB=0; SP_SIZES=${SP_SIZES:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # CPU: no compilation, no loader processes, small images and rows (the tiny models' settings, not the recipes')
  DRY_KEYS=(torch_compile=false dataloader_num_workers=0 max_pixels=50176 max_tokens_per_batch=1024 model_max_length=1024)
else
  source tools/gpu/env.sh
  trap 'bundle_out scaling' EXIT   # also after a failed step or a TERM from a time-out (not a KILL)
  # DeepSpeed (+ pydantic, hjson, ...) and PyAV, which the image lacks: tools/gpu/scaling_wheels.sh, carried
  if compgen -G ".whl-scaling/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-scaling/*.whl || exit 1
  else
    echo "[scaling] no .whl-scaling/ carried: the zero2 / zero3 runs (deepspeed) and sp (PyAV) will fail"
  fi
  PY=python3; GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}; GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  TINY=; WORK=${WORK:-/dev/shm/vltune-scaling}
  STEPS=${STEPS:-12}; WARM=${WARM:-4}; BIG_STEPS=${BIG_STEPS:-50}; SP_FRAMES=${SP_FRAMES:-500}; SP_PX=${SP_PX:-512}
  SAMPLES=${SAMPLES:-2000}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  DRY_KEYS=()
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never NVLink multicast
export PYTHONUNBUFFERED=1
RES=$WORK/results; RUN_TIMEOUT=${RUN_TIMEOUT:-900}
mkdir -p "$RES" "$WORK/logs" "$OUT/scaling"
RECIPE_3B=recipes/qwen2_5_vl_3b_full_1gpu.yaml
RECIPE_7B=recipes/qwen2_5_vl_7b_full_1gpu.yaml
$PY -c "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__,
  'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))" | tee "$OUT/scaling/machine.json"

assets() {  # DIR SHAPE [DEVICE]: a random-init model of SHAPE (the tiny one of its family on DRY) and the JPEG set
  [ -f "$1/model/config.json" ] && [ -f "$1/data/train.jsonl" ] && return 0
  echo "[scaling] assets $2 -> $1"
  $PY tools/gpu/train_speed.py assets --dir "$1" --shape "$2" $TINY --samples "$SAMPLES" --device "${3:-cuda}" > "$WORK/logs/assets-$2.log" 2>&1 \
    || { tail -20 "$WORK/logs/assets-$2.log"; return 1; }
}

record() {  # ITEM RUN ENGINE NPROC MODEL COMMAND STATUS WALL METRICS LOG
  local line
  line=$($PY tools/gpu/scaling_summary.py record --item "$1" --run "$2" --engine "$3" --nproc "$4" --model "$5" --command "$6" \
    --exit "$7" --wall-s "$8" --metrics "$9" --log "${10}" --warmup "$WARM" --gpu-name "$GPU_NAME" --gpu-count "$GPUS")
  echo "$line" >> "$RES/$1.jsonl"; echo "$line" >> "$OUT/scaling/$1.jsonl"
  $PY -c "import json,sys; r=json.loads(sys.argv[1]); print('[scaling]', {k: r.get(k) for k in ('run','exit','tokens_per_s_per_gpu','mfu','peak_mem_gib_per_gpu','steps')})" "$line"
  cp "$9" "$OUT/scaling/$2.metrics.jsonl" 2>/dev/null
  [ "$7" -eq 0 ] || cp "${10}" "$OUT/scaling/$2.log"
}

run_train() {  # ITEM RUN ENGINE NPROC MODEL RECIPE KEY=VALUE...: vltune train under torchrun, then record
  local item=$1 run=$2 engine=$3 nproc=$4 model=$5 recipe=$6; shift 6
  local out=$WORK/out/$run log=$WORK/logs/$run.log keys=() kv start status
  for kv in "$@"; do keys+=("--${kv%%=*}" "${kv#*=}"); done
  rm -rf "$out"
  echo "[scaling] $run: vltune train $recipe --nproc $nproc ${keys[*]}"
  start=$(date +%s)
  timeout "$RUN_TIMEOUT" $PY -m torch.distributed.run --standalone --nproc_per_node "$nproc" tools/gpu/scaling_worker.py \
    train "$recipe" "${keys[@]}" --output_dir "$out" --no-progress > "$log" 2>&1
  status=$?
  record "$item" "$run" "$engine" "$nproc" "$model" "vltune train $recipe --nproc $nproc ${keys[*]} (tools/gpu/scaling_worker.py: no final save)" \
    "$status" $(( $(date +%s) - start )) "$out/metrics.jsonl" "$log"
  rm -rf "$out"
}

engine_keys() {  # ENGINE -> the recipe keys that choose it
  case $1 in fsdp) echo fsdp=true ;; zero2) echo deepspeed=zero2 ;; zero3) echo deepspeed=zero3 ;; *) echo "" ;; esac
}

dp3b() {
  local dir=$WORK/dp3b n engine
  assets "$dir" qwen2_5_vl-3b || return
  for n in ${DP_COUNTS:-1 2 4 8}; do
    [ "$n" -le "$GPUS" ] || continue
    for engine in ${DP_ENGINES:-ddp fsdp zero2}; do
      # the 3B recipe's settings, except bf16_master_weights (one process only: several ranks refuse it; FSDP2
      # and ZeRO keep fp32 masters themselves), so that every N and engine keeps fp32 masters and AdamW state
      run_train dp3b "dp3b-$engine-x$n" "$engine" "$n" qwen2_5_vl-3b "$RECIPE_3B" $(engine_keys "$engine") \
        model_name_or_path="$dir/model" dataset_use="$dir/data/train.jsonl" max_steps="$STEPS" logging_steps=1 save_steps=0 \
        warmup_ratio=0 bf16_master_weights=false max_pixels=1003520 "${DRY_KEYS[@]}" ${DP_KEYS:-}
    done
  done
}

big() {
  local shape=${BIG_SHAPE:-qwen2_5_vl-7b} n=${BIG_N:-$GPUS} accum=${BIG_ACCUM:-1} engine
  local dir=$WORK/big-$shape
  assets "$dir" "$shape" || return
  local common=(model_name_or_path="$dir/model" dataset_use="$dir/data/train.jsonl" max_steps="$BIG_STEPS" logging_steps=1
                save_steps=0 max_pixels=1003520 "${DRY_KEYS[@]}")
  for engine in ${BIG_ENGINES-fsdp zero3}; do
    # fp32 masters and torch AdamW, sharded (adamw_torch_8bit is one-process only); the recipe's checkpointing
    run_train big "big-$shape-$engine-x$n" "$engine" "$n" "$shape" "$RECIPE_7B" $(engine_keys "$engine") "${common[@]}" \
      pure_bf16=false optim=adamw_torch gradient_accumulation_steps="$accum" ${BIG_KEYS:-}
  done
  # one GPU, the same global batch (n x accum rows a step): the 7B recipe as it is (pure_bf16, 8-bit AdamW,
  # checkpointing), since fp32 masters and AdamW state (16 bytes a weight) do not fit one GPU
  # (DRY: BIG_REF_KEYS makes it the sharded runs' fp32 masters and torch AdamW, so that the per-step losses
  # check that N processes x accum and 1 process x N*accum train on the same rows with the same loss)
  [ "${BIG_REF:-1}" = 1 ] && run_train big "big-$shape-single-x1" single 1 "$shape" "$RECIPE_7B" "${common[@]}" \
    gradient_accumulation_steps=$(( n * accum )) ${BIG_REF_KEYS:-} ${BIG_KEYS:-}
}

moe() {
  local shape=${MOE_SHAPE:-qwen3_vl-30b-a3b} n=${MOE_N:-$GPUS} engine pure=${MOE_PURE_BF16:-false}
  local dir=$WORK/moe-$shape
  assets "$dir" "$shape" "${MOE_ASSET_DEVICE:-cuda}" || return
  # fp32 masters + AdamW of a 31-35B model are ~16 bytes a weight / N: over 60 GB a GPU on 8 (pure_bf16 is refused
  # with fsdp / deepspeed; the stock run follows MOE_PURE_BF16 too)
  local data=(model_name_or_path="$dir/model" dataset_use="$dir/data/train.jsonl" max_pixels=1003520)
  for engine in ${MOE_ENGINES:-fsdp zero3 stock}; do
    if [ "$engine" = stock ]; then
      local out=$WORK/out/moe-stock log=$WORK/logs/moe-$shape-stock-x$n.log start status flags=(--checkpointing)
      [ "$pure" = true ] && flags+=(--pure-bf16)
      rm -rf "$out"; start=$(date +%s)
      echo "[scaling] moe-$shape-stock-x$n: stock_fsdp.py --nproc $n"
      timeout "$RUN_TIMEOUT" $PY -m torch.distributed.run --standalone --nproc_per_node "$n" tools/gpu/stock_fsdp.py \
        --recipe "$RECIPE_3B" --out "$out" --batch "${STOCK_BATCH:-4}" --steps "$STEPS" "${flags[@]}" "${data[@]}" \
        "${DRY_KEYS[@]}" > "$log" 2>&1
      status=$?
      record moe "moe-$shape-stock-x$n" stock_fsdp2 "$n" "$shape" \
        "torchrun --nproc_per_node $n tools/gpu/stock_fsdp.py --recipe $RECIPE_3B --batch ${STOCK_BATCH:-4} --steps $STEPS ${flags[*]}" \
        "$status" $(( $(date +%s) - start )) "$out/metrics.jsonl" "$log"
    else
      # the 3B recipe's layout (4096-token packed rows, one a GPU a step), checkpointing on
      run_train moe "moe-$shape-$engine-x$n" "$engine" "$n" "$shape" "$RECIPE_3B" $(engine_keys "$engine") "${data[@]}" \
        max_steps="$STEPS" logging_steps=1 save_steps=0 warmup_ratio=0 bf16_master_weights=false gradient_accumulation_steps=1 \
        gradient_checkpointing=true pure_bf16="$pure" "${DRY_KEYS[@]}" ${MOE_KEYS:-}
    fi
  done
}

sp() {
  local shape=${SP_SHAPE:-qwen3_vl-8b} s
  local dir=$WORK/sp-$shape steps=${SP_STEPS:-6}
  SAMPLES=8 assets "$dir" "$shape" || return
  [ -f "$dir/video/train.jsonl" ] || $PY tools/gpu/scaling_assets.py video --dir "$dir/video" --frames "$SP_FRAMES" --size "$SP_PX" --rows "$steps" || return
  # Qwen3-VL: 16-px patches, 2 x 2 merge, 2 frames a temporal patch -> FRAMES / 2 x (PX / 32)^2 video tokens
  local len=$(( SP_FRAMES / 2 * (SP_PX / 32) * (SP_PX / 32) + 256 ))
  local keys=(model_name_or_path="$dir/model" dataset_use="$dir/video/train.jsonl" "${DRY_KEYS[@]}" data_flatten=true
              max_tokens_per_batch="$len" model_max_length="$len" video_min_frames="$SP_FRAMES" video_max_frames="$SP_FRAMES"
              video_max_pixels=$(( SP_FRAMES * SP_PX * SP_PX * 2 )) max_steps="$steps" logging_steps=1 save_steps=0 warmup_ratio=0
              gradient_accumulation_steps=1 gradient_checkpointing=true bf16_master_weights=false pure_bf16=false
              optim=adamw_torch fsdp=true)
  for s in ${SP_SIZES:-4 8}; do
    [ "$s" -le "$GPUS" ] || continue
    run_train sp "sp-$shape-s$s-x$s" fsdp "$s" "$shape" "$RECIPE_3B" "${keys[@]}" sequence_parallel_size="$s" ${SP_KEYS:-}
  done
  # the whole row on one GPU (FSDP2 on one rank, the same keys): where it fits, its losses are the reference
  [ "${SP_REF:-1}" = 1 ] && run_train sp "sp-$shape-unsharded-x1" unsharded 1 "$shape" "$RECIPE_3B" "${keys[@]}" ${SP_KEYS:-}
}

for item in "${@:-dp3b}"; do
  case $item in
    dp3b|big|moe|sp) "$item" ;;
    *) echo "unknown item $item (dp3b big moe sp)"; exit 2 ;;
  esac
done
$PY tools/gpu/scaling_summary.py summary "$RES" "$OUT/scaling/summary.json"
