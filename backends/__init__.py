"""The two engines that implement core.contracts.TrainBackend: torch/ (transformers models, torchrun,
DDP / DeepSpeed ZeRO / FSDP2) and mindspore/ (native MindSpore models, msrun).

They mirror each other file for file (engine, parallel, distributed, launch, checkpoint, optim, loss,
lora, generate, mdlm, attention, models/<family>), and this registry is the one way in: training asks
`engine(name, "parallel").build_backend(...)`, inference `engine(name, "generate").InferenceEngine(...)`.
Importing one engine never imports the other.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ENGINES = ("torch", "mindspore")
ALIASES = {"ms": "mindspore"}
"""DESIGN.md spells the MindSpore engine `ms` on the command line."""


def engine_name(name: str) -> str:
    """`torch` or `mindspore` (`ms` accepted); anything else is a ValueError naming the choices."""
    resolved = ALIASES.get(name, name)
    if resolved not in ENGINES:
        raise ValueError(f"backend {name!r}: expected one of {', '.join(ENGINES)} (or ms)")
    return resolved


def engine(name: str, part: str) -> ModuleType:
    """The module `part` (parallel, generate, ...) of engine `name`, imported on first use."""
    return importlib.import_module(f"{__name__}.{engine_name(name)}.{part}")
