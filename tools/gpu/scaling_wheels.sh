#!/usr/bin/env bash
# Run here (with PyPI), not on the GPU machine: the wheels that issue 28's scaling runs (tools/gpu/scaling.sh)
# need and the GPU image (Python 3.12, torch 2.11, transformers 5.17; KINDS.md's package list) lacks, into
# .whl-scaling/ (git-ignored through .git/info/exclude). scaling.sh installs them into /tmp/site as env.sh does .whl/.
#   deepspeed (the ZeRO-2 / ZeRO-3 engines; .venv's version, a source package: built here into a pure-Python
#     wheel, no ops compiled; its JIT ops, if any were used, build there with the image's nvcc and ninja) and
#     what it imports that the image lacks: hjson, pydantic + pydantic-core (cp312 manylinux), annotated-types,
#     typing-inspection, typing-extensions (pydantic 2.14 wants >= 4.16). The image has ninja, py-cpuinfo,
#     msgpack, psutil, einops, numpy, packaging, tqdm.
#   av (PyAV, cp312 manylinux): the sp item's video rows.
# Usage (repo root): bash tools/gpu/scaling_wheels.sh; then carry .whl-scaling (tools/gpu/scaling.sh's header).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
dest=.whl-scaling
ver() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
grep -qx '/.whl-scaling/' .git/info/exclude 2>/dev/null || echo '/.whl-scaling/' >> .git/info/exclude
rm -rf "$dest" && mkdir -p "$dest"
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --no-deps -d "$dest" "${plat[@]}" \
  pydantic=="$(ver pydantic)" pydantic-core=="$(ver pydantic_core)" annotated-types=="$(ver annotated-types)" \
  typing-inspection=="$(ver typing-inspection)" typing-extensions=="$(ver typing_extensions)" hjson=="$(ver hjson)" \
  av=="$(ver av)"
# deepspeed is published as a source package only; its setup.py imports torch, hence no build isolation
$PIP wheel -q --no-deps --no-build-isolation -w "$dest" deepspeed=="$(ver deepspeed)"
ls -la "$dest" && du -sh "$dest"
