#!/usr/bin/env bash
# Run on the lent GPU machine (no network, torch/transformers/torchvision preinstalled, vltune not
# installed): the whole suite (AutoProcessor parity needs torchvision, which only that image has) and
# the demo recipe on CUDA with bf16.
# Usage (repo root): bash tools/gpu/smoke.sh    -- logs go to $OUT when set.
set -uo pipefail
source tools/gpu/env.sh
python3 -c "import torch, transformers, torchvision, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log"
python3 -m vltune.cli train demo --no-progress --bf16 true --output_dir runs/demo_gpu 2>&1 | tail -3 | tee "$OUT/demo.log"
