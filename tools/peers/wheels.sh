#!/usr/bin/env bash
# Run here (with PyPI), not on the GPU machine: downloads the peers and what they import that the GPU
# image (torch 2.11, transformers 5.17, accelerate, peft, pandas, pyarrow, aiohttp, ... : KINDS.md's list)
# lacks, for its Python 3.12, into .whl-peers/ (14 MB; tools/peers/pack.sh packs them for one call). One set serves
# both peers: trl 0.24.0 is inside both pins; datasets 4.8.4 is ms-swift's (it imports `datasets.features.Json`),
# above LLaMA-Factory's <= 4.0.0 pin, which the version check below lets pass (LLaMA-Factory trained with it).
#   ms-swift 4.6.0 (transformers < 5.20: the image's 5.17 is used as it is). modelscope 1.36: 1.40 needs
#     modelscope-hub, which needs cryptography, a compiled package the image lacks.
#   LLaMA-Factory 0.9.5 pins transformers <= 5.6.0, accelerate <= 1.11 and peft <= 0.18.1; it runs on the
#     image's versions with DISABLE_VERSION_CHECK=1 (tools/peers/run.sh). Its web UI, API and audio / video
#     readers (gradio, fastapi, av) are not imported by `llamafactory-cli train` on image data.
#   pydantic (ms-swift imports it; the image has none). liger-kernel 0.8.5 (both peers' --use_liger_kernel / enable_liger_kernel), torchao 0.18 (vltune fp8).
# Usage (repo root): bash tools/peers/wheels.sh
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
dest=.whl-peers
rm -rf "$dest" && mkdir -p "$dest"
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --no-deps -d "$dest" "${plat[@]}" \
  ms-swift==4.6.0 modelscope==1.36.0 addict==2.4.0 attrdict==2.0.1 binpacking==2.0.1 dacite==1.9.2 \
  json-repair==0.64.6 qwen-vl-utils==0.0.14 \
  llamafactory==0.9.5 fire==0.7.1 termcolor==3.3.0 omegaconf==2.3.0 tyro==0.8.14 docstring-parser==0.18.0 \
  shtab==1.13.0 torchdata==0.11.0 \
  datasets==4.8.4 dill==0.4.0 multiprocess==0.70.18 trl==0.24.0 liger-kernel==0.8.5 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  torchao==0.18.0
# antlr4 (omegaconf's parser runtime) is published as a source package only: build its pure-Python wheel.
$PIP wheel -q --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
ls -la "$dest" && du -sh "$dest"
