"""What the sequence-parallel code path costs where it shards nothing: one GPU, a group of one (N = 1).

    python3 tools/gpu/sp_overhead.py --model-shape qwen2_5_vl-3b --layers 18 --out $OUT/sp_overhead.json

One data-parallel engine (DDP on a one-rank NCCL group, as `vltune train` builds it for several GPUs)
trains the bench's packed rows (backends/torch/bench.py: the same random-init shape and mixed workload);
its sequence-parallel hooks are installed, and timed blocks alternate between running them (every
row through `pad_row`, the all-to-all around each attention, the split vision encoding, the sharded
language-model inputs, the row-total all-reduce, with a group of one rank) and not. Reports tokens/s of
each (the median over blocks) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", default="qwen2_5_vl-3b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--pack-length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of each path, alternating")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from vltune.core.flops import SHAPES
    from vltune.backends.torch import bench

    torch.backends.cuda.enable_cudnn_sdp(False)  # as vltune bench
    shape = bench.reduced_depth(SHAPES[args.model_shape], args.layers)
    report = measure(shape, torch.device("cuda"), args.pack_length, args.steps, args.blocks)
    report["model_shape"] = args.model_shape
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)


def measure(shape, device: torch.device, pack_length: int, steps_per_block: int, blocks: int) -> dict:
    from vltune.backends.torch import bench
    from vltune.backends.torch.distributed import init_distributed
    from vltune.backends.torch.parallel import DDPBackend
    from vltune.backends.torch.sequence_parallel import SequenceParallel
    from vltune.core.config import ModelArgs, TrainArgs

    ctx = init_distributed(need_group=True)
    model = bench.build_model(shape, 0, device)
    engine = DDPBackend(model, Path("."), bench._info(shape), ModelArgs(model_name_or_path="bench"),
                        TrainArgs(bf16=device.type == "cuda", learning_rate=1e-5, max_grad_norm=1.0, weight_decay=0.0), ctx=ctx)
    sharded = SequenceParallel(ctx.rank, ctx.world_size, 1)
    sharded.install(engine.base)
    rows = bench._packed_rows(shape, 16 * (steps_per_block + 2), pack_length, 0)
    steps = [rows[i:i + 2] for i in range(0, len(rows) - 1, 2)]
    if len(steps) < 2 + steps_per_block:
        raise RuntimeError(f"{len(steps)} steps of packed rows, {2 + steps_per_block} needed")
    tokens = [sum(int(r["input_ids"].shape[1]) for r in step) for step in steps]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def block(sequence, chosen) -> float:
        engine.sequence = sequence
        sync()
        start = time.perf_counter()
        for step in chosen:
            bench.packed_step(engine, step)
        sync()
        return time.perf_counter() - start

    block(None, steps[:2])
    block(sharded, steps[:2])  # warm-up of both paths
    timed, timed_tokens = steps[2:2 + steps_per_block], sum(tokens[2:2 + steps_per_block])
    speeds = {"off": [], "on_n1": []}
    for _ in range(blocks):
        for name, sequence in (("off", None), ("on_n1", sharded)):
            speeds[name].append(timed_tokens / block(sequence, timed))
    median = {k: round(statistics.median(vs), 1) for k, vs in speeds.items()}
    ctx.close()
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "layers": shape.layers,
        "pack_length": pack_length, "rows_per_step": 2, "steps_per_block": steps_per_block, "blocks": blocks,
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in speeds.items()},
        "median_tokens_per_s": median, "cost": round(1 - median["on_n1"] / median["off"], 4),
    }


if __name__ == "__main__":
    main()
