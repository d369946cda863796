#!/usr/bin/env bash
# Run here (with network to PyPI), not on the GPU machine: packs FlashAttention-4 (flash-attn-4, CuTe DSL)
# and its pure-Python / prebuilt dependencies for the GPU image (torch 2.11 + CUDA 13, Python 3.12) into
# .fa4/, small enough to carry (the device tool carries at most 64 MiB): xz -9e with a 256 MiB window
# brings the 92 MB cutlass DSL library wheel to about 50 MiB. Also a transformers trimmed to the model
# families vltune and peft import. tools/gpu/fa4_env.sh unpacks them on the GPU machine.
# Usage (repo root): bash tools/gpu/fa4_pack.sh    (takes ~6 minutes on 2 cores)
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
work=$(mktemp -d)
dest=.fa4
mkdir -p "$dest"
plat=(--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --no-deps -d "$work/w" "${plat[@]}" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 einops==0.8.2
mkdir -p "$work/small" "$work/cu13"
for f in "$work"/w/*.whl; do
  case $f in *libs_cu13*) unzip -q -o "$f" -d "$work/cu13" ;; *) unzip -q -o "$f" -d "$work/small" ;; esac
done
(cd "$work/small" && tar cf - . | xz -9e -T2) > "$dest/small.tar.xz"
(cd "$work/cu13" && tar cf - . | xz -9e --lzma2=preset=9e,dict=256MiB -T1) > "$dest/cutlass_cu13.tar.xz"
# transformers as pinned in .whl/ (when there is one), without the model families nothing here imports
# (the full wheel is 13 MB). The peers' runs use the image's transformers and need none.
if compgen -G ".whl/transformers-*.whl" >/dev/null; then
  mkdir -p "$work/tf" && unzip -q "$(ls .whl/transformers-*.whl | head -1)" -d "$work/tf"
  for d in "$work"/tf/transformers/models/*/; do
    case $(basename "$d") in auto|bloom|encoder_decoder|qwen2|qwen2_vl|qwen2_5_vl|qwen3|qwen3_vl) ;; *) rm -rf "$d" ;; esac
  done
  (cd "$work/tf" && tar cf - . | xz -9 -T2) > "$dest/transformers.tar.xz"
fi
rm -rf "$work"
ls -la "$dest"
