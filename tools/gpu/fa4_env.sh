# Sourced on the GPU machine after tools/gpu/env.sh, with .fa4/ carried (made by tools/gpu/fa4_pack.sh):
# unpacks FlashAttention-4, its CuTe DSL runtime and the trimmed transformers into /tmp/site.
mkdir -p /tmp/site
for f in .fa4/*.tar.xz; do tar xJf "$f" -C /tmp/site || return 1; done
# nvidia-cutlass-dsl puts its packages on sys.path through a .pth file, which PYTHONPATH entries do not run.
export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
