# Sourced by the tools/gpu/*.sh scripts on the lent GPU machine (no network; torch, torchvision and
# transformers preinstalled, vltune not installed): installs the wheels carried in .whl/ (transformers
# as pinned, PyAV, ...) into /tmp/site and puts the repository on PYTHONPATH as the package `vltune`.
OUT=${OUT:-/tmp/vltune-gpu}
export OUT
mkdir -p "$OUT" /tmp/pkg
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
ln -sfn "$PWD" /tmp/pkg/vltune
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
