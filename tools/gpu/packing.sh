#!/usr/bin/env bash
# Run on the lent GPU machine: packing and varlen attention on CUDA (issue 7). The CUDA kernels against
# the eager definition (bf16 and fp32, forward and backward), the Qwen2.5-VL vision tower on a 1008x1008
# image (stock per-window sdpa vs one varlen call per layer), and packed-vs-one-by-one parity in bf16.
# Carried wheels in .whl/ (transformers 5.23 as pinned, PyAV for the corpus' videos) are installed first.
# Usage (repo root): bash tools/gpu/packing.sh [--vision-only]    -- logs and packing_bench.json go to $OUT when set.
set -uo pipefail
source tools/gpu/env.sh
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/unit/ops/test_varlen_attention.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 tools/gpu/packing_bench.py "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/packing_bench.log"
