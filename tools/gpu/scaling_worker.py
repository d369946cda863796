"""torchrun worker of tools/gpu/scaling.sh: `vltune train` (vltune.cli main, unchanged) without writing the final model.

    python3 -m torch.distributed.run --standalone --nproc_per_node N tools/gpu/scaling_worker.py train RECIPE --key value ...

The worker command that `vltune train RECIPE --nproc N --key value` starts, except that every engine's
save_model is a no-op: gathering and writing a 7B-35B model after each 10-50-step timing run would cost
the device more than the run (train_speed.py does the same). save_steps is 0 in these runs, so nothing else is written.
"""

from __future__ import annotations

import sys

from vltune.backends.torch import engine, parallel


def _skip(self, out_dir) -> None:
    if getattr(getattr(self, "ctx", None), "is_main", True):
        print("[scaling] final model not written", flush=True)


for cls in (engine.Engine, parallel.DDPBackend, parallel.FSDPBackend, parallel.DeepSpeedBackend):
    cls.save_model = _skip

if __name__ == "__main__":
    from vltune.cli import main

    sys.exit(main(sys.argv[1:]))
