"""torchrun worker of test_fsdp_fp8.py: `vltune.training.train` on each recipe of RUNS_JSON in turn (the same
pipeline as `vltune train --nproc 2`, one process start for all), with two test-only changes made here:

* the engine's fp8 device check is lifted (`check_fp8_device`: the CPU has no float8 tensor cores, but
  torch's CPU `torch._scaled_mm` runs the float8 matmuls), exactly as tests/unit/backends/test_fp8.py does;
* the engine built is probed once it is sharded, and each training micro-batch on the way in; rank 0
  writes what it saw to OUT_DIR/probe.json of each run.

    torchrun --nproc_per_node 2 fsdp_fp8_worker.py RUNS_JSON      (RUNS_JSON: [{"recipe": path, "output_dir": path}])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import vltune.backends.torch.engine as engine_module
import vltune.backends.torch.parallel as parallel
from vltune.backends.torch.distributed import init_distributed
from vltune.training import train


def probe(engine) -> dict:
    """Which modules are float8 and how FSDP2 holds their weights, on this rank."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torchao.float8.float8_linear import Float8Linear

    float8 = {name: m for name, m in engine.base.named_modules() if isinstance(m, Float8Linear)}
    layers = [name for name, m in engine.base.named_modules() if isinstance(m, FSDPModule)]
    return {
        "engine": type(engine).__name__,
        "fsdp_units": layers,
        "float8": sorted(float8),
        "float8_in_fsdp_unit": sorted(n for n in float8 if any(n.startswith(u + ".") for u in layers if u)),
        "float8_weight_sharded": sorted(
            n for n, m in float8.items()
            if isinstance(m.weight, DTensor) and m.weight.to_local().shape[0] < m.weight.shape[0]),
        "micro_batches": [],
    }


def main(runs: list[dict]) -> None:
    # One process group for all the runs: train() then joins it and leaves it up (a group destroyed and made
    # again in the same torchrun workers hangs).
    ctx = init_distributed(need_group=True)
    engine_module.check_fp8_device = lambda device: None  # the CPU refusal, lifted (see the docstring)
    build_backend = parallel.build_backend
    for run in runs:
        seen: dict = {}

        def probed(*args, **kwargs):
            engine = build_backend(*args, **kwargs)
            seen.update(probe(engine))
            forward_backward = engine.forward_backward

            def recorded(batch, loss_scale):
                seen["micro_batches"].append({"rows": int(batch["input_ids"].shape[0]),
                                              "sequences": int(batch["cu_seqlens"].shape[0]) - 1 if "cu_seqlens" in batch else None})
                return forward_backward(batch, loss_scale)

            engine.forward_backward = recorded
            return engine

        parallel.build_backend = probed
        train(run["recipe"], {"output_dir": run["output_dir"]}, show_progress=False)
        parallel.build_backend = build_backend
        if ctx.is_main:
            (Path(run["output_dir"]) / "probe.json").write_text(json.dumps(seen, indent=1))
        ctx.barrier()
    ctx.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(json.loads(Path(sys.argv[1]).read_text()))
