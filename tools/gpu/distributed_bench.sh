#!/usr/bin/env bash
# Data-parallel throughput on the lent 2-GPU machine (nvidia-h200-x2): `vltune train --nproc N` with
# DeepSpeed ZeRO-2 on 1 and 2 GPUs, ZeRO-3 and FSDP2 on 2, on a Qwen2.5-VL-3B-shaped random init
# (bf16, LLM + merger trained, vision tower frozen), synthetic 448x448 VQA (256 image tokens a sample),
# BATCH samples per GPU per step (default 40, ~11.6k tokens) with activation checkpointing (CKPT=true). The setup also times a
# GPU0 -> GPU1 copy, the link that gradient reduction runs over. Per run: median tokens/s per GPU over steps 4..10 and the largest
# peak allocated memory over ranks, appended to $OUT/dist_bench.jsonl (logs in $OUT/RUN.log).
# The machine's image lacks DeepSpeed / pydantic / hjson and has an older transformers: the wheels in
# .whl/p6/ (carried; see docs/distributed.md) are installed first.
# Usage (repo root): [BATCH=40 CKPT=true] bash tools/gpu/distributed_bench.sh [zero2x1 zero2x2 zero3x2 fsdpx2 zero2bx1 zero2bx2]
# (default: the first four)
set -uo pipefail
OUT=${OUT:-/tmp/vltune-gpu}
WORK=${WORK:-/dev/shm/vltune-bench}   # tmpfs: the 3B model is read once per rank and saved once per run
mkdir -p "$OUT" "$WORK" /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/p6/*.whl || exit 1
ln -sfn "$PWD" /tmp/pkg/vltune
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # never NVLink multicast here

WORK="$WORK" BATCH="${BATCH:-40}" CKPT="${CKPT:-true}" python3 - <<'EOF' 2>&1 | tee "$OUT/setup.log"
import json, os, time
from pathlib import Path
import torch, transformers, deepspeed
from vltune.backends.torch.tiny import make_tiny
from vltune.data.synthetic import SyntheticVQAConfig, generate_vqa_dataset

work = Path(os.environ["WORK"])
print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__,
      "gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], flush=True)
model_dir = work / "qwen2_5_vl_3b"
if not (model_dir / "model.safetensors.index.json").exists() and not (model_dir / "model.safetensors").exists():
    t0 = time.time()
    tiny = make_tiny("qwen2_5_vl", work / "tiny", seed=0)  # tokenizer, processor files, special token ids
    cfg = json.loads((tiny / "config.json").read_text())
    # Qwen2.5-VL-3B-Instruct's sizes (its config.json); token ids stay the tiny tokenizer's.
    # BENCH_SIZE=tiny keeps the tiny sizes: a dry run of this script on a CPU.
    if os.environ.get("BENCH_SIZE") != "tiny":
        cfg["text_config"].update(
            hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
            vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=128000, layer_types=["full_attention"] * 36,
            max_window_layers=70,
        )
        cfg["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]
        cfg["vision_config"].update(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
        )
        cfg["tie_word_embeddings"] = True
    config = transformers.Qwen2_5_VLConfig.from_dict(cfg)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    for f in tiny.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            (model_dir / f.name).write_bytes(f.read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e9:.2f}B parameters, written in {time.time() - t0:.0f}s", flush=True)
    del model
if torch.cuda.device_count() > 1:  # one-way GPU0 -> GPU1 bandwidth: NVLink ~ hundreds of GB/s, PCIe ~ 50
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda:0")
    for i in range(4):
        torch.cuda.synchronize(0); torch.cuda.synchronize(1); t = time.perf_counter()
        y = x.to("cuda:1"); torch.cuda.synchronize(1)
        if i:
            print(f"GPU0->GPU1 copy: {x.numel() * 2 / (time.perf_counter() - t) / 1e9:.0f} GB/s", flush=True)
    del x, y
generate_vqa_dataset(work / "vqa", SyntheticVQAConfig(num_train=800, num_eval=0, image_size=448, tasks=("color", "shape"), seed=0))
(work / "bench.yaml").write_text(f"""model_name_or_path: {model_dir}
dataset_use: {work / 'vqa' / 'train.jsonl'}
max_pixels: 200704
model_max_length: 1024
max_steps: 10
per_device_train_batch_size: {os.environ['BATCH']}
gradient_accumulation_steps: 1
learning_rate: 1.0e-5
lr_scheduler_type: constant
bf16: true
gradient_checkpointing: {os.environ['CKPT']}
logging_steps: 1
""")
EOF

for run in ${@:-zero2x1 zero2x2 zero3x2 fsdpx2}; do
  case $run in
    zero2x1) nproc=1; engine=(--deepspeed zero2) ;;
    zero2x2) nproc=2; engine=(--deepspeed zero2) ;;
    # zero2b: the bundled zero2.json with DeepSpeed's own default reduce bucket (5e8 elements) instead of
    # the HF-style "auto" = hidden^2 (4.2M for the 3B: ~740 buckets of gradients per step)
    zero2bx1|zero2bx2)
      python3 -c "import json,sys; c=json.load(open('recipes/deepspeed/zero2.json')); c['zero_optimization']['reduce_bucket_size']=500000000; json.dump(c,open(sys.argv[1],'w'))" "$WORK/zero2_bucket5e8.json"
      nproc=${run#zero2bx}; engine=(--deepspeed "$WORK/zero2_bucket5e8.json") ;;
    zero3x2) nproc=2; engine=(--deepspeed zero3) ;;
    fsdpx2)  nproc=2; engine=(--fsdp true) ;;
    *) echo "unknown run $run"; exit 2 ;;
  esac
  command="python3 -m vltune.cli train $WORK/bench.yaml --nproc $nproc ${engine[*]} --output_dir $WORK/out-$run --no-progress"
  start=$(date +%s)
  $command > "$WORK/$run.log" 2>&1
  status=$?
  RUN=$run NPROC=$nproc STATUS=$status SECONDS_TAKEN=$(( $(date +%s) - start )) COMMAND="vltune train bench.yaml --nproc $nproc ${engine[*]}" \
    METRICS="$WORK/out-$run/metrics.jsonl" python3 - <<'EOF' | tee -a "$OUT/dist_bench.jsonl"
import json, os, statistics
rows = []
if os.path.exists(os.environ["METRICS"]):
    rows = [json.loads(l) for l in open(os.environ["METRICS"]) if '"loss"' in l]
steady = [r for r in rows if r["step"] >= 4]
nproc = int(os.environ["NPROC"])
result = {"run": os.environ["RUN"], "command": os.environ["COMMAND"], "exit": int(os.environ["STATUS"]),
          "wall_s": int(os.environ["SECONDS_TAKEN"]), "steps": len(rows)}
if steady:
    total = statistics.median(r["tokens_per_s"] for r in steady)
    result.update(tokens_per_s=round(total), tokens_per_s_per_gpu=round(total / nproc),
                  peak_mem_gib_per_gpu=max(r.get("peak_mem_gib", 0) for r in rows),
                  loss_first=rows[0]["loss"], loss_last=rows[-1]["loss"])
print(json.dumps(result), flush=True)
EOF
  cp "$WORK/out-$run/metrics.jsonl" "$OUT/$run.metrics.jsonl" 2>/dev/null
  [ $status -eq 0 ] || { cp "$WORK/$run.log" "$OUT/"; tail -40 "$WORK/$run.log"; }
  rm -rf "$WORK/out-$run"
done
