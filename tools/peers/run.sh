#!/usr/bin/env bash
# Run on the lent GPU machine (repo root, with .peers-pack/ from tools/peers/pack.sh carried, or the wheels
# of tools/peers/wheels.sh in .whl-peers/ and FlashAttention-4 in .fa4/): vltune, ms-swift and LLaMA-Factory
# train the same random-init model on the same JSONL + JPEG data with the same settings, one after the
# other in this call; tools/peers/summary.py then writes one table per mode into $OUT/peers/MODE/.
#
#   install              the peers -> /tmp/peers-site, FA4 -> /tmp/fa4-site, torchao (if carried) -> /tmp/site
#   assets-3b, assets-7b a Qwen2.5-VL-3B / -7B shaped model and 800 samples (tools/gpu/train_speed.py
#                        assets) under /tmp/peers/3b|7b, plus the peers' copy (tools/peers/data.py);
#                        kept while the machine stays warm, so a later call skips them
#   3b-full              full fine-tune, LLM + merger trained, vision tower frozen, lr 1e-5
#   7b-lora              LoRA r 64 / alpha 128 / dropout 0.05 on every LLM linear, merger trained, lr 2e-4
#                        (vltune also with fp8: true when torchao is carried)
#   7b-fp8               only vltune's two 7B LoRA runs of 7b-lora, bf16 and fp8 (carry .peers-pack/torchao.tar.xz
#                        alone: the whole pack and the repository pass the 64 MiB a call carries)
#   7b-fp8-loss          vltune's 7B LoRA, bf16 and fp8: LOSS_STEPS (200) optimizer steps of one row, the loss
#                        logged every step; loss_curve.json holds the largest per-step relative difference
# Common to every run: bf16, rows of 4096 tokens packed (each tool's packing), 4 rows (micro-batches)
# per optimizer step, max_pixels 1,003,520, STEPS=20 optimizer steps of which the first WARM=8 are not
# timed, cosine schedule without warm-up, no checkpoint written.
# Each peer tries its fastest setting first and falls back on failure (recorded in NAME.meta.json):
#   ms-swift:      --packing true with flash_attention_4 (needs FA4), Liger, no gradient checkpointing
#                  -> the same without Liger -> padded batches of 4 with sdpa and gradient checkpointing;
#   LLaMA-Factory: packing with sdpa, Liger, no gradient checkpointing -> with gradient checkpointing.
#     Its neat_packing (samples kept apart) needs FlashAttention-2 (`flash_attn`, not installable
#     here: a source build) and, with sdpa, stopped on a mask of 4112 for a row of 4104 tokens in a
#     CPU dry run (transformers 5.6.0 and 5.17.0); its plain packing lets samples of a row attend to
#     one another, so its loss is not the separate samples' loss.
# Usage: bash tools/peers/run.sh install assets-3b 3b-full
set -uo pipefail
source tools/gpu/env.sh
trap 'bundle_out peers' EXIT   # also after a failed step or a TERM from a time-out (not a KILL)
STEPS=${STEPS:-20}; WARM=${WARM:-8}; SAMPLES=${SAMPLES:-800}
PY=python3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
hook=$PWD/tools/peers/hook

unpack() {  # PART TARGET SOURCES...: xz tarballs or wheels, unpacked once (a warm machine keeps them: /tmp/.unpacked-PART)
  local part=$1 target=$2; shift 2
  [ -f /tmp/.unpacked-$part ] && { echo "[peers] $part unpacked earlier"; return; }
  mkdir -p "$target"
  case $1 in
    *.tar.xz) for f in "$@"; do tar xJf "$f" -C "$target" || exit 1; done ;;
    *) $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" || exit 1 ;;
  esac
  touch /tmp/.unpacked-$part
}

install() {  # the peers -> /tmp/peers-site, FA4 -> /tmp/fa4-site, torchao -> /tmp/site: each part that is carried
  if [ -f .peers-pack/peers.tar.xz ]; then unpack peers /tmp/peers-site .peers-pack/peers.tar.xz
  elif compgen -G ".whl-peers/*.whl" >/dev/null; then unpack peers /tmp/peers-site $(ls .whl-peers/*.whl | grep -v torchao); fi
  local fa4=.peers-pack; [ -f $fa4/small.tar.xz ] || fa4=.fa4
  [ -f $fa4/small.tar.xz ] && unpack fa4 /tmp/fa4-site $fa4/small.tar.xz $fa4/cutlass_cu13.tar.xz
  if [ -f .peers-pack/torchao.tar.xz ]; then unpack torchao /tmp/site .peers-pack/torchao.tar.xz
  elif compgen -G ".whl-peers/torchao-*.whl" >/dev/null; then unpack torchao /tmp/site .whl-peers/torchao-*.whl; fi
  mkdir -p "$OUT/peers"  # the versions, in every call
  env $(peer_env) $PY -c "
import json, importlib.metadata as m
names = ['torch', 'transformers', 'ms-swift', 'llamafactory', 'liger-kernel', 'datasets', 'trl', 'peft', 'accelerate', 'flash-attn-4', 'torchao']
versions = {}
for n in names:
    try: versions[n] = m.version(n)
    except m.PackageNotFoundError: versions[n] = None
import torch; versions['gpu'] = torch.cuda.get_device_name()
print(json.dumps(versions))" | tee "$OUT/peers/versions.json"
}

assets() {  # SHAPE DIR
  [ -f "$2/peers/messages.jsonl" ] && { echo "[peers] assets in $2 kept"; return; }
  $PY tools/gpu/train_speed.py assets --dir "$2" --shape "$1" --samples "$SAMPLES" 2>&1 | grep -v -i warn | tail -2
  $PY tools/peers/data.py "$2"
}

peer_env() {  # the peer's own packages, the timing hook first; FA4 when unpacked
  local fa4=""
  [ -d /tmp/fa4-site/flash_attn ] && fa4=/tmp/fa4-site:/tmp/fa4-site/nvidia_cutlass_dsl/dsl_packages
  echo "PYTHONPATH=$hook:/tmp/peers-site${fa4:+:$fa4} DISABLE_VERSION_CHECK=1 MAX_PIXELS=1003520"
}

try_peer() {  # NAME DIR SETTING CMD... : runs the command with the timing hook, records the outcome
  local name=$1 dir=$2 setting=$3; shift 3
  local timing=$dir/$name.jsonl log=$dir/$name.log start=$SECONDS
  rm -f "$timing"
  env $(peer_env) PEER_TIMING="$timing" timeout "${PEER_TIMEOUT:-300}" "$@" >"$log" 2>&1
  local rc=$?
  $PY - "$dir/$name.meta.json" "$setting" "$rc" "$((SECONDS - start))" "$*" <<'PY'
import json, sys
path, setting, rc, wall, cmd = sys.argv[1:]
tries = json.load(open(path)) if __import__("os").path.exists(path) else []
tries.append({"setting": setting, "rc": int(rc), "wall_s": int(wall), "command": cmd})
json.dump(tries, open(path, "w"), indent=2)
PY
  [ $rc -eq 0 ] && grep -q '"t"' "$timing" 2>/dev/null && { echo "[peers] $name: $setting ok (${SECONDS}s)"; return 0; }
  echo "[peers] $name: $setting failed rc=$rc:"; grep -v -i warn "$log" | tail -4
  return 1
}

swift_run() {  # DIR OUTDIR TUNER_ARGS...
  local dir=$1 out=$2; shift 2
  local common=(-m swift.cli.main sft --model "$dir/model" --model_type qwen2_5_vl --template qwen2_5_vl
    --dataset "$dir/peers/messages.jsonl" --split_dataset_ratio 0 --torch_dtype bfloat16 --max_length 4096
    --freeze_vit true --freeze_aligner false --freeze_llm false
    --lr_scheduler_type cosine --warmup_ratio 0 --max_steps "$STEPS" --logging_steps 1 --save_strategy no
    --report_to none --dataloader_num_workers 4 --dataset_num_proc 8 --seed 0 --output_dir /tmp/peers/out/swift "$@")
  if [ -d /tmp/fa4-site/flash_attn ]; then
    try_peer ms-swift "$out" "packing, flash_attention_4, Liger, no gradient checkpointing" $PY "${common[@]}" \
      --packing true --attn_impl flash_attention_4 --use_liger_kernel true --gradient_checkpointing false \
      --per_device_train_batch_size 1 --gradient_accumulation_steps 4 && return
    try_peer ms-swift "$out" "packing, flash_attention_4, no Liger, no gradient checkpointing" $PY "${common[@]}" \
      --packing true --attn_impl flash_attention_4 --use_liger_kernel false --gradient_checkpointing false \
      --per_device_train_batch_size 1 --gradient_accumulation_steps 4 && return
  fi
  try_peer ms-swift "$out" "padded batches of 4, sdpa, gradient checkpointing" $PY "${common[@]}" \
    --attn_impl sdpa --use_liger_kernel false --gradient_checkpointing true --per_device_train_batch_size 4 --gradient_accumulation_steps 4
}

lf_run() {  # DIR OUTDIR YAML_LINES
  local dir=$1 out=$2 extra=$3 yaml
  for gc in false true; do  # with Liger, without gradient checkpointing first
    yaml=$out/llamafactory-gc-$gc.yaml
    cat >"$yaml" <<YAML
model_name_or_path: $dir/model
image_max_pixels: 1003520
stage: sft
do_train: true
freeze_vision_tower: true
freeze_multi_modal_projector: false
freeze_language_model: false
dataset: vltune_bench
dataset_dir: $dir/peers
template: qwen2_vl
cutoff_len: 4096
packing: true
neat_packing: false
flash_attn: sdpa
enable_liger_kernel: true
disable_gradient_checkpointing: $([ $gc = true ] && echo false || echo true)
preprocessing_num_workers: 8
dataloader_num_workers: 4
bf16: true
per_device_train_batch_size: 1
gradient_accumulation_steps: 4
lr_scheduler_type: cosine
warmup_steps: 0
max_steps: $STEPS
logging_steps: 1
save_strategy: "no"
report_to: none
seed: 0
output_dir: /tmp/peers/out/llamafactory
overwrite_output_dir: true
$extra
YAML
    try_peer llamafactory "$out" "packing (samples attend across), sdpa, Liger, $([ $gc = true ] || echo "no ")gradient checkpointing" \
      $PY -m llamafactory.cli train "$yaml" && return
  done
}

vltune_run() {  # DIR OUTDIR NAME RECIPE KEYS...
  local dir=$1 out=$2 name=$3 recipe=$4; shift 4
  OUT=$out $PY tools/gpu/train_speed.py run --dir "$dir" --name "$name" --recipe "$recipe" --steps "$STEPS" \
    --log-every "${LOG_EVERY:-4}" --warmup-steps "$WARM" "$@" 2>&1 | grep -v -i warn | tail -2
}

# vltune's 7B LoRA keys (qwen2_5_vl_lora recipe): the peers' packed rows, 4 per step, pure bf16
LORA_7B=(data_flatten=true max_tokens_per_batch=4096 per_device_train_batch_size=1 gradient_accumulation_steps=4
         pure_bf16=true dataloader_num_workers=4)

vltune_7b() {  # OUTDIR KEYS...: vltune's 7B LoRA in bf16, then with fp8 when torchao is carried
  local out=$1; shift
  vltune_run /tmp/peers/7b "$out" vltune-bf16 qwen2_5_vl_lora "${LORA_7B[@]}" "$@"
  if $PY -c "import torchao" 2>/dev/null; then vltune_run /tmp/peers/7b "$out" vltune-fp8 qwen2_5_vl_lora "${LORA_7B[@]}" "$@" fp8=true
  else echo "[peers] torchao not carried: no vltune fp8 run"; fi
}

for item in "$@"; do
  case $item in
    install) install ;;
    assets-3b) assets qwen2_5_vl-3b /tmp/peers/3b ;;
    assets-7b) assets qwen2_5_vl-7b /tmp/peers/7b ;;
    3b-full)
      out=$OUT/peers/3b-full; mkdir -p "$out"
      vltune_run /tmp/peers/3b "$out" vltune-bf16 qwen2_5_vl_3b_full_1gpu dataloader_num_workers=4
      swift_run /tmp/peers/3b "$out" --tuner_type full --learning_rate 1e-5
      lf_run /tmp/peers/3b "$out" $'finetuning_type: full\nlearning_rate: 1.0e-5'
      $PY tools/peers/summary.py "$out" --warmup "$WARM" ;;
    7b-lora)
      out=$OUT/peers/7b-lora; mkdir -p "$out"
      vltune_7b "$out"
      swift_run /tmp/peers/7b "$out" --tuner_type lora --lora_rank 64 --lora_alpha 128 --lora_dropout 0.05 \
        --target_modules all-linear --learning_rate 2e-4
      lf_run /tmp/peers/7b "$out" $'finetuning_type: lora\nlora_rank: 64\nlora_alpha: 128\nlora_dropout: 0.05\nlora_target: all\nlearning_rate: 2.0e-4'
      $PY tools/peers/summary.py "$out" --warmup "$WARM" ;;
    7b-fp8)  # vltune's 7B LoRA of 7b-lora, bf16 and fp8 in one call: the fp8 speed-up (torchao alone carried)
      out=$OUT/peers/7b-fp8; mkdir -p "$out"
      vltune_7b "$out"
      $PY tools/peers/summary.py "$out" --warmup "$WARM" ;;
    7b-fp8-loss)  # the loss of LOSS_STEPS (200) steps of one packed row each, bf16 against fp8, same init and data
      out=$OUT/peers/7b-fp8-loss; mkdir -p "$out"
      STEPS=${LOSS_STEPS:-200} LOG_EVERY=1 vltune_7b "$out" gradient_accumulation_steps=1  # the later key wins (train_speed.py's dict)
      $PY tools/peers/summary.py "$out" --loss-curve vltune-bf16 vltune-fp8 ;;
    *) echo "unknown item $item"; exit 2 ;;
  esac
done
