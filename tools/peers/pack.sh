#!/usr/bin/env bash
# Run here, after tools/peers/wheels.sh and tools/gpu/fa4_pack.sh: packs what tools/peers/run.sh needs on
# the GPU machine into .peers-pack/, small enough to travel with the repository in one call (the device
# tool carries at most 64 MiB in all): the peers' wheels unpacked into one xz tarball (5 MB instead of
# 14), without modelscope's model zoo (models/, pipelines/, trainers/, preprocessors/, ops/: 27 MB that
# ms-swift's `sft` does not import; a CPU dry run trained with them removed), and FlashAttention-4's two
# tarballs for ms-swift's packing. torchao (vltune's fp8) is left out: the fp8 runs carry .whl-peers.
# Usage (repo root): bash tools/peers/pack.sh
set -euo pipefail
dest=.peers-pack
work=$(mktemp -d)
rm -rf "$dest" && mkdir -p "$dest" "$work/site"
for f in .whl-peers/*.whl; do
  case $f in *torchao*) ;; *) unzip -q -o "$f" -d "$work/site" ;; esac
done
rm -rf "$work"/site/modelscope/{models,pipelines,trainers,preprocessors,ops}
(cd "$work/site" && tar cf - . | xz -9e -T2) > "$dest/peers.tar.xz"
cp .fa4/small.tar.xz .fa4/cutlass_cu13.tar.xz "$dest/"
rm -rf "$work"
ls -la "$dest" && du -sh --apparent-size "$dest"
