"""Peak host memory of one long packed row under sequence parallelism, on CPU, against the model in
core/sequence_parallel.activation_bytes (docs/distributed.md).

    python tools/sp_memory.py --out docs/bench/cpu-sp-memory.json            # runs N = 1 and N = 2

Each N runs `torchrun --nproc_per_node N` of this file's worker: a text model of 512 hidden x 4 layers
(Qwen2.5-VL layout, random init), one warm-up micro-step on a short row, then one on a row of
`--tokens` tokens (16 samples); the worker reports the growth of its peak resident set
(ru_maxrss) over that step, which is the step's activations (weights, gradients and the warm-up's
buffers are already resident).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 512, 4, 8, 4, 1376


def _row(tokens: int, samples: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    length = tokens // samples
    ids = rng.integers(10, vocab - 100, size=(1, tokens))
    labels = ids.copy()
    cu = np.arange(0, tokens + 1, length, dtype=np.int32)
    labels[0, cu[:-1]] = -100
    positions = np.tile(np.arange(length), samples)
    return {"input_ids": ids, "labels": labels, "position_ids": np.broadcast_to(positions, (3, 1, tokens)).copy(),
            "cu_seqlens": cu, "max_seqlen": np.int64(length)}


def worker(model_dir: str, tokens: int, size: int, checkpointing: bool, result: str) -> None:
    import torch

    from vltune.backends.torch.distributed import init_distributed
    from vltune.core.recipe import load_recipe
    from vltune.data.model_info import read_model_info

    ctx = init_distributed(need_group=True)
    cfg = load_recipe({"model_name_or_path": model_dir, "dataset_use": "unused.jsonl", "data_flatten": True,
                       "sequence_parallel_size": size, "gradient_checkpointing": checkpointing, "output_dir": tempfile.mkdtemp()})
    info = read_model_info(model_dir)
    from vltune.backends.torch.models import load_model
    from vltune.backends.torch.parallel import DDPBackend

    # DDP for every N (also a group of one), so N = 1 and N = 2 differ only in the sharding
    engine = DDPBackend(load_model(model_dir, dtype=torch.float32, attn_implementation="sdpa"), Path(model_dir), info,
                        cfg.model, cfg.train, None, ctx=ctx)
    vocab = engine.base.config.get_text_config().vocab_size
    engine.forward_backward(_row(512, 4, vocab), 1.0)  # weights, gradients, optimizer-free buffers resident
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine.forward_backward(_row(tokens, 16, vocab), 1.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grown = ctx.all_reduce([after - before], op="max")[0]
    if ctx.is_main:
        Path(result).write_text(json.dumps({"peak_growth_bytes": grown}))
    ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, tokens, size, checkpointing, result = args.worker
        return worker(model_dir, int(tokens), int(size), checkpointing == "1", result)

    from vltune.backends.torch.tiny import TinySize, make_tiny
    from vltune.core.sequence_parallel import activation_bytes

    root = Path(tempfile.mkdtemp())
    model_dir = make_tiny("qwen2_5_vl", root / "model", size=TinySize(
        text_hidden=HIDDEN, text_layers=LAYERS, text_heads=HEADS, text_kv_heads=KV_HEADS, text_intermediate=INTERMEDIATE))
    rows = []
    for size in map(int, args.sizes.split(",")):
        result = root / f"n{size}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(size), __file__,
                   "--out", args.out, "--worker", str(model_dir), str(args.tokens), str(size),
                   "1" if args.gradient_checkpointing else "0", str(result)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        measured = json.loads(result.read_text())["peak_growth_bytes"]
        vocab = json.loads((model_dir / "config.json").read_text())["text_config"]["vocab_size"]
        model = activation_bytes(args.tokens, HIDDEN, LAYERS, size, bytes_per_value=4, checkpointing=args.gradient_checkpointing,
                                 intermediate=INTERMEDIATE, heads=HEADS, vocab=vocab)
        rows.append({"sequence_parallel_size": size, "measured_peak_growth_mib": round(measured / 2**20, 1),
                     "model_per_rank_mib": round(model["per_rank_bytes"] / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
    report = {"tokens": args.tokens, "samples_in_row": 16, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS,
              "intermediate": INTERMEDIATE, "dtype": "float32", "gradient_checkpointing": args.gradient_checkpointing,
              "machine": "CPU (gloo)", "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
