"""The launch flags `vltune train` shares between its launchers (torchrun for torch, msrun for MindSpore).

One set of names -- torchrun's -- so one cluster script serves both engines; each backend's launch.py
turns them into its launcher's command line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaunchArgs:
    """`--nproc N [--nnodes M --node_rank R --master_addr A --master_port P]`."""

    nproc: int
    """Workers on this node (one per accelerator)."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    """Address of node 0; None on one node = a free local port."""
    master_port: int = 29500

    def problems(self) -> list[str]:
        """Every problem of the flags, for one clear error before anything starts."""
        problems = []
        if self.nproc < 1:
            problems.append(f"--nproc {self.nproc} must be >= 1")
        if self.nnodes < 1:
            problems.append(f"--nnodes {self.nnodes} must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            problems.append(f"--node_rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            problems.append("--nnodes > 1 needs --master_addr (the address of node 0)")
        return problems
