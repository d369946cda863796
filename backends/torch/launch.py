"""`vltune train RECIPE --nproc N [--nnodes M --node_rank R --master_addr A --master_port P]`.

The launcher is torchrun (`python -m torch.distributed.run`), for every torch engine: DDP, FSDP2
and DeepSpeed alike. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
is all `deepspeed.initialize` needs, so the `deepspeed` launcher (ssh/pdsh fan-out from a hostfile)
adds nothing on one node and would fight a cluster scheduler on several; with torchrun the same
command works under Slurm (`tools/slurm/train.sbatch`) and by hand.

Each worker re-runs the very same `vltune train RECIPE --key value ...` command line, minus the
launch flags: the recipe is read again in every worker, never pickled across.

The command is the same on Ascend NPUs (torch_npu): `--nproc` counts NPUs there, and each worker finds
its device, HCCL and DeepSpeed's npu accelerator itself (backends/torch/device.py). The launcher imports
no torch, so it decides nothing about devices.
"""

from __future__ import annotations

import atexit
import os
import shlex
import subprocess
import sys
from typing import NoReturn

from vltune.core.launch import LaunchArgs


def inside_launcher() -> bool:
    """True in a torchrun worker (torchrun sets TORCHELASTIC_RUN_ID for each): it must train, not launch again.

    Not LOCAL_RANK: a one-rank DeepSpeed run without a launcher sets that itself."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker that has finished: atexit handlers, flushed output, then `os._exit`.

    It skips only the interpreter's own teardown. A finished run's process groups are destroyed but
    not always freed (DDP's reducer and ZeRO-3's hooks keep references from C++), and their gloo
    worker threads, still holding tensors, meet a half-torn-down interpreter at exit: now and then a
    rank aborts ("terminate called without an active exception", pytorch/pytorch#190489) after the
    run itself succeeded, and torchrun then fails the whole launch.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch_command(launch: LaunchArgs, train_args: list[str], python: str | None = None) -> list[str]:
    """The torchrun command that runs `vltune train *train_args` in `launch.nproc` workers on this node.

    `train_args` is the worker's command line after `train` (the recipe and its --key value overrides).
    """
    command = [python or sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nproc)]
    if launch.nnodes == 1 and not launch.master_addr:
        command.append("--standalone")
    else:
        command += [
            "--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
            "--master_addr", str(launch.master_addr), "--master_port", str(launch.master_port),
        ]
    return command + ["-m", "vltune.cli", "train", *train_args]


def run_launch(launch: LaunchArgs, train_args: list[str], print_only: bool = False) -> int:
    """Print (`--print-launch`) or run the torchrun command; the exit status is torchrun's."""
    command = launch_command(launch, train_args)
    if print_only:
        print(shlex.join(command), flush=True)
        return 0
    print(f"[vltune] launching: {shlex.join(command)}", file=sys.stderr, flush=True)
    return subprocess.run(command, check=False).returncode
