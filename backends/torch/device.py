"""Which accelerator this process trains on (a CUDA GPU, an Ascend NPU through torch_npu, or the CPU),
decided in one place, with what follows from it: the device, the process-group backend and the
DeepSpeed accelerator.

torch_npu is optional (DESIGN.md): it is imported only when no CUDA device is present, and only if it
is installed. Importing it is what makes Ascend visible to torch at all: it names the `npu` device
type (`privateuse1` renamed) and registers `torch.npu`, the `torch.cuda` twin. Callers ask here
instead of `torch.cuda.is_available()`, so a torch run on Ascend takes the same code path as on a
GPU: its own device per torchrun worker, HCCL where a GPU has NCCL, DeepSpeed's `npu` accelerator.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

KINDS = ("cuda", "npu", "cpu")

_PROCESS_GROUP_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
"""The collective library of each kind: NCCL on GPUs, HCCL (Huawei's) on NPUs, gloo on CPU."""

DEEPSPEED_ACCELERATOR_ENV = "DS_ACCELERATOR"


@dataclass(frozen=True)
class Accelerator:
    """One kind of device ("cuda", "npu" or "cpu") and the names the rest of the stack knows it by."""

    kind: str

    @property
    def process_group_backend(self) -> str:
        """`torch.distributed.init_process_group`'s backend for this kind: nccl, hccl or gloo."""
        return _PROCESS_GROUP_BACKENDS[self.kind]

    @property
    def deepspeed_accelerator(self) -> str:
        """DeepSpeed's name for its accelerator of this kind (the value `DS_ACCELERATOR` takes)."""
        return self.kind

    @property
    def module(self) -> ModuleType | None:
        """`torch.cuda` or `torch.npu` (set_device, current_device, memory statistics); None on CPU."""
        return None if self.kind == "cpu" else getattr(torch, self.kind)

    def device(self, index: int | None = None) -> torch.device:
        """The device of this kind numbered `index`, or the current one (a torchrun worker has set its own)."""
        if self.module is None:
            return torch.device("cpu")
        return torch.device(self.kind, self.module.current_device() if index is None else index)

    def set_device(self, index: int) -> None:
        """Make device `index` this process' current one, before any work on it (a no-op on CPU)."""
        if self.module is not None:
            self.module.set_device(index)


def _npu_available() -> bool:
    """True when torch_npu imports and sees an NPU. An installed torch_npu that fails to load (no CANN
    toolkit in the environment, a driver mismatch) is reported and ignored: the run goes on without it."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and the `npu` device type)
    except ImportError as error:
        if getattr(error, "name", None) != "torch_npu":
            warnings.warn(f"torch_npu is installed but does not load ({error}); not using Ascend NPUs", stacklevel=2)
        return False
    except OSError as error:
        warnings.warn(f"torch_npu is installed but does not load ({error}); not using Ascend NPUs", stacklevel=2)
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


@functools.cache
def accelerator() -> Accelerator:
    """This process' accelerator: a CUDA GPU if torch sees one, else an Ascend NPU if torch_npu is
    installed and sees one, else the CPU. Decided once per process (callers ask often, e.g. per
    collective); tests that swap torch_npu for a stand-in clear the cache."""
    if torch.cuda.is_available():
        return Accelerator("cuda")
    if _npu_available():
        return Accelerator("npu")
    return Accelerator("cpu")


def current_device() -> torch.device:
    """The device this process computes on: its current GPU or NPU, else the CPU."""
    return accelerator().device()


def deepspeed_accelerator() -> Any:
    """DeepSpeed's accelerator object, of the same kind as ours.

    DeepSpeed picks its accelerator once, when it is first imported, by `DS_ACCELERATOR` or else by
    probing (an importable torch_npu counts as an NPU even without one). The variable is set to this
    process' kind unless the user has set it, so both agree; if DeepSpeed had already chosen another
    (imported before, or a contrary `DS_ACCELERATOR`), its ZeRO would place state on the wrong device,
    so that is an error naming both."""
    wanted = accelerator().deepspeed_accelerator
    os.environ.setdefault(DEEPSPEED_ACCELERATOR_ENV, wanted)
    from deepspeed.accelerator import get_accelerator

    chosen = get_accelerator()
    if chosen.device_name() != wanted:
        raise RuntimeError(
            f"DeepSpeed runs on its {chosen.device_name()!r} accelerator but this process trains on {wanted!r}: "
            f"set {DEEPSPEED_ACCELERATOR_ENV}={wanted} (or unset it) before deepspeed is imported"
        )
    return chosen
