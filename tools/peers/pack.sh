#!/usr/bin/env bash
# Run here, after tools/peers/wheels.sh and tools/gpu/fa4_pack.sh: packs what tools/peers/run.sh needs on
# the GPU machine into .peers-pack/, small enough to travel with the repository in one call (the device
# tool carries at most 64 MiB in all): the peers' wheels unpacked into one xz tarball (5 MB instead of
# 14), without modelscope's model zoo and data sets (models/, pipelines/, msdatasets/, ...: 29 MB that
# ms-swift's `sft` does not import; a CPU dry run trained with them removed) nor the peers' web UIs and
# Megatron / Ray back ends (imported lazily by other commands), FlashAttention-4's two tarballs for
# ms-swift's packing, and torchao's Python part for vltune's fp8 run (its compiled mxfp8 / cutlass
# extensions, 13 MB, serve other recipes than float8 tensorwise). The dist-infos' RECORD files go too
# (nothing is pip-installed from here; versions are read from METADATA). With the repository the pack must
# stay under the 64 MiB a call carries (measured: 66.9 MB of files in all was refused, 66.2 MB passed).
# Usage (repo root): bash tools/peers/pack.sh
set -euo pipefail
dest=.peers-pack
work=$(mktemp -d)
rm -rf "$dest" && mkdir -p "$dest" "$work/site"
mkdir -p "$work/torchao"
for f in .whl-peers/*.whl; do
  case $f in *torchao*) unzip -q -o "$f" -d "$work/torchao" ;; *) unzip -q -o "$f" -d "$work/site" ;; esac
done
rm -f "$work"/torchao/torchao/*.so "$work"/torchao/torchao/prototype/spinquant/_hadamard_matrices.*
rm -f "$work"/site/*.dist-info/RECORD "$work"/torchao/*.dist-info/RECORD
(cd "$work/torchao" && tar cf - . | xz -9e -T2) > "$dest/torchao.tar.xz"
rm -rf "$work"/site/modelscope/{models,pipelines,trainers,preprocessors,ops,msdatasets,metrics,exporters,cli}
# Web UIs, Megatron and Ray back ends, LLaMA-Factory's experimental v1: imported only by other commands.
rm -rf "$work"/site/swift/{ui,megatron,ray,cli/_megatron} "$work"/site/llamafactory/{webui,v1}
# Test suites, scripts, type stubs, licence copies and pydantic's v1 shim (tyro guards its import): not imported.
rm -rf "$work"/site/{dill,multiprocess,binpacking}/tests "$work"/site/*.data "$work"/site/pydantic/v1 "$work"/site/pydevd_plugins
find "$work/site" \( -name '*.pyi' -o -path '*.dist-info/licenses/*' \) -delete
(cd "$work/site" && tar cf - . | xz -9e -T2) > "$dest/peers.tar.xz"
# FlashAttention-4's pure-Python part without what the GPU image has (einops) or a run does not load
# (tvm-ffi's C++ and Cython sources; the dlpack add-ons built for other torch releases than 2.11).
mkdir -p "$work/fa4" && tar xJf .fa4/small.tar.xz -C "$work/fa4"
rm -rf "$work"/fa4/einops "$work"/fa4/einops-* "$work"/fa4/tvm_ffi/{src,cython} "$work"/fa4/*.dist-info/RECORD
# libbacktrace's sources (built into libtvm_ffi.so) and the CuTe DSL's profiler injection library (iket.profiler,
# which nothing a run loads imports). libtvm_ffi_testing.so stays: tvm_ffi's core module links against it.
rm -rf "$work"/fa4/tvm_ffi/3rdparty "$work"/fa4/nvidia_cutlass_dsl/dsl_packages/iket/profiler
find "$work/fa4/torch_c_dlpack_ext" -name '*.so' ! -name '*torch211*' -delete
(cd "$work/fa4" && tar cf - . | xz -9e -T2) > "$dest/small.tar.xz"
cp .fa4/cutlass_cu13.tar.xz "$dest/"
rm -rf "$work"
ls -la "$dest" && du -sh --apparent-size "$dest"
