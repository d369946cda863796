#!/usr/bin/env bash
# Run here (with PyPI), not on the GPU machine: the wheels that tools/gpu/env.sh installs from .whl/ on the GPU
# image (torch 2.11, transformers 5.17, Triton 3.6, Python 3.12), for one kind of run:
#   qwen3_5   transformers 5.23.0, fla-core 0.6.0, torchao 0.18.0      (tools/gpu/qwen3_5.sh; ~17 MB)
#   ovis2_5   transformers 5.25.0 and huggingface_hub 2.4.0, which it needs; torchao 0.18.0 (tools/gpu/ovis2_5.sh)
# The GPU image has the rest (tokenizers, safetensors, einops, ...). .whl/ is git-ignored (.git/info/exclude);
# a call carries it: run(command=..., carry=[".whl"]).
# Usage (repo root): bash tools/gpu/wheels.sh qwen3_5
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
case ${1:-} in
  qwen3_5) wheels=(transformers==5.23.0 fla-core==0.6.0 torchao==0.18.0) ;;
  ovis2_5) wheels=(transformers==5.25.0 huggingface_hub==2.4.0 torchao==0.18.0) ;;
  *) echo "usage: bash tools/gpu/wheels.sh qwen3_5 | ovis2_5"; exit 2 ;;
esac
rm -rf .whl && mkdir -p .whl
$PIP download -q --no-deps -d .whl "${plat[@]}" "${wheels[@]}"
ls -la .whl && du -sh .whl
