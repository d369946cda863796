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

# The device tool brings back at most 8 files from $OUT, none deeper than 2 folders: a results folder of
# more files loses the rest (the first peers call lost its timings so). bundle_out NAME packs $OUT/NAME
# into $OUT/NAME.tar.gz and copies its summaries (*.md, summary.json, loss_curve.json: NAME-PARENT-FILE) beside it, so
# they can be read in the call's reply; unpack the tarball here into docs/bench/.
bundle_out() {
  local dir=$OUT/$1 f rel
  [ -d "$dir" ] || return 0
  while IFS= read -r f; do
    rel=${f#"$dir"/}; cp "$f" "$OUT/$1-${rel//\//-}"
  done < <(find "$dir" -type f \( -name '*.md' -o -name summary.json -o -name loss_curve.json \) | head -4)
  tar czf "$OUT/$1.tar.gz" -C "$OUT" "$1" && rm -rf "$dir"
}
