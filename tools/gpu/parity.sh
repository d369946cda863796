#!/usr/bin/env bash
# Run on the lent GPU machine, whose image has torchvision (transformers' Qwen VL processors need it):
# vltune's data pipeline against transformers' AutoProcessor (200-sample corpus, both families) and
# the video processors. Carried wheels in .whl/ (transformers 5.23 as pinned, PyAV) are installed first.
# Usage (repo root): bash tools/gpu/parity.sh    -- logs go to $OUT when set.
set -uo pipefail
source tools/gpu/env.sh
python3 -c "import torch, transformers, torchvision, numpy, av; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, 'av', av.__version__)"
python3 -m pytest -q -p no:cacheprovider -rs tests/unit/data/test_processor_parity.py tests/unit/data/test_video.py \
  tests/unit/backends/test_tiny_model.py tests/unit/data/test_vision.py 2>&1 | tee "$OUT/parity.log"
# Ovis2.5 videos against Ovis2_5VideoProcessor (needs a transformers with models/ovis2_5, 5.25+).
if python3 -c "import transformers.models.ovis2_5" 2>/dev/null; then
  python3 tools/gpu/parity_ovis_video.py --out "$OUT/parity_ovis_video.json" 2>&1 | tee "$OUT/parity_ovis_video.log"
fi
