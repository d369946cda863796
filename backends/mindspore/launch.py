"""`vltune train RECIPE --backend mindspore --nproc N [--nnodes M --node_rank R --master_addr A --master_port P]`.

The launcher is msrun, MindSpore's own: on every node it starts `--local_worker_num` workers and, on
the node whose address is `--master_addr`, the scheduler that builds the cluster; each worker
learns its rank from `mindspore.communication.init()` (backends/mindspore/distributed.py). As with
torchrun (backends/torch/launch.py, whose flag names this mirrors), every worker re-runs the very same
`vltune train RECIPE --key value ...` command line minus the launch flags, and reads the recipe itself.

msrun starts the workers (and the scheduler, which runs the same command up to `init()`) as
`python ...` looked up on PATH, not as the interpreter that runs msrun; so the command puts this
interpreter's directory first on PATH, or workers of a virtualenv would start the system python.
This module imports neither mindspore nor torch: printing or starting the command needs neither.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vltune.core.launch import LaunchArgs as CoreLaunchArgs

MSRUN_MODULE = "mindspore.parallel.cluster.run"
"""What the `msrun` console script runs (used when the script is not beside this interpreter)."""


@dataclass
class LaunchArgs(CoreLaunchArgs):
    """core.launch.LaunchArgs plus msrun's log directory; `nproc` is msrun's --local_worker_num and on
    one node without --master_addr msrun's scheduler listens on 127.0.0.1 at a free port."""

    log_dir: str = "msrun_log"
    """Where msrun writes scheduler.log and worker_RANK.log (each worker's stdout and stderr)."""

    @property
    def worker_num(self) -> int:
        """Workers over all nodes: msrun's --worker_num (every node runs --nproc of them)."""
        return self.nproc * self.nnodes


def inside_launcher() -> bool:
    """True in a process msrun started (a worker, or the scheduler that runs the same command up to
    `init()`): it must train, not launch again. msrun sets MS_ROLE for both."""
    return "MS_ROLE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin_dir(python: str) -> str:
    """The directory whose `python` msrun must find first: this interpreter's (a venv's bin/)."""
    return str(Path(python).parent)


def launch_command(launch: LaunchArgs, train_args: list[str], python: str | None = None) -> list[str]:
    """The msrun command that runs `vltune train *train_args` in `launch.nproc` workers on this node.

    `train_args` is the worker's command line after `train` (the recipe and its --key value overrides).
    The workers are `python -m vltune.cli train ...`: msrun runs its task with `python` from PATH
    (see `launch_env`), given a script; a bare `python` task keeps the `-m` form.
    """
    python = python or sys.executable
    msrun = Path(_bin_dir(python)) / "msrun"
    command = ["msrun"] if msrun.exists() else [python, "-m", MSRUN_MODULE]
    master_addr = launch.master_addr or "127.0.0.1"
    # One node without an address: nobody else has to find the scheduler, so take a free port (as
    # torchrun --standalone does) and two runs on one machine do not collide on the default.
    master_port = launch.master_port if launch.master_addr else _free_port()
    command += [
        "--worker_num", str(launch.worker_num), "--local_worker_num", str(launch.nproc),
        "--master_addr", master_addr, "--master_port", str(master_port), "--node_rank", str(launch.node_rank),
        "--log_dir", str(launch.log_dir), "--join", "True",
    ]
    return command + ["python", "-m", "vltune.cli", "train", *train_args]


def launch_env(python: str | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment msrun runs in: `base` (os.environ) with this interpreter's directory first on PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([_bin_dir(python or sys.executable), *filter(None, [env.get("PATH")])])
    return env


def shell_line(command: list[str], python: str | None = None) -> str:
    """`command` as one sh line with the PATH prefix `launch_env` applies, for `--print-launch`."""
    return f'PATH={shlex.quote(_bin_dir(python or sys.executable))}:"$PATH" {shlex.join(command)}'


def rank0_summary(log_dir: str | Path) -> dict | None:
    """The run summary rank 0 printed as its last JSON line, read back from its msrun log.

    msrun forwards the workers' logs to the console with `tail -f` and kills those tails as soon as
    the workers exit, so the final lines (the summary among them) may never reach the console; the
    launcher prints it again from the file so that `vltune train`'s last stdout line is the summary
    with msrun too. None when this node has no rank 0 (node_rank > 0) or it printed none.
    """
    log = Path(log_dir) / "worker_0.log"
    if not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "steps" in row:
                return row
    return None


def run_launch(launch: LaunchArgs, train_args: list[str], print_only: bool = False) -> int:
    """Print (`--print-launch`) or run the msrun command; the exit status is msrun's."""
    command = launch_command(launch, train_args)
    if print_only:
        print(shell_line(command), flush=True)
        return 0
    print(f"[vltune] launching: {shell_line(command)}", file=sys.stderr, flush=True)
    code = subprocess.run(command, check=False, env=launch_env()).returncode
    if code == 0 and (summary := rank0_summary(launch.log_dir)) is not None:
        print(json.dumps(summary), flush=True)
    return code
