"""Where the host's time goes in the compiled 3B step: cProfile over a few steady-state optimizer steps.

The compiled step's host work (Python, guards, wrappers, kernel launches) is nearly as long as its GPU
work (docs/performance.md), so it caps what faster kernels can give. This profiles the host side of
`speed_probe`'s `compile_master` variant after every row length is compiled, and writes the top
functions by own time and by cumulative time, plus the wall time per row with and without the profiler.

Usage (repo root, on the GPU machine, after tools/gpu/env.sh):
    python3 tools/gpu/host_profile.py [--samples 24] [--rows-per-step 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from speed_probe import VARIANTS, make_backend, step  # noqa: E402

from vltune.backends.torch.bench import _packed_rows  # noqa: E402
from vltune.core.flops import SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2_5_vl-3b")
    parser.add_argument("--variant", default="compile_master")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--rows-per-step", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "host_profile.txt"))
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    shape = SHAPES[args.shape]
    rows = _packed_rows(shape, args.samples, 4096, seed=0)
    k = args.rows_per_step
    steps = [rows[i:i + k] for i in range(0, len(rows), k)]
    train, hooks = VARIANTS[args.variant]
    backend = make_backend(shape, train, hooks, "full")
    for batch in steps:  # every row length compiled before anything is measured
        step(backend, batch)
    torch.cuda.synchronize()

    start = time.perf_counter()
    for batch in steps:
        step(backend, batch)
    torch.cuda.synchronize()
    plain = (time.perf_counter() - start) / len(rows) * 1e3

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for batch in steps:
        step(backend, batch)
    torch.cuda.synchronize()
    profiler.disable()
    profiled = (time.perf_counter() - start) / len(rows) * 1e3

    text = io.StringIO()
    text.write(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {args.variant}, {len(rows)} rows in {len(steps)} steps\n")
    text.write(f"ms per row: {plain:.1f} without the profiler, {profiled:.1f} with it\n\n")
    for order, count in (("tottime", 60), ("cumtime", 60)):
        text.write(f"=== by {order} (seconds over all {len(rows)} rows) ===\n")
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(count)
    with open(args.out, "w") as f:
        f.write(text.getvalue())
    print(text.getvalue()[:3000])


if __name__ == "__main__":
    main()
