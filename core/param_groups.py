"""Which optimizer group a parameter joins, the same rule on both backends.

Groups are (component, decays): component llm | vision | merger from the parameter's name (plain or
peft-wrapped) through the family's module map (`ModuleMap.component_of`, the one parameter-role rule,
which freezing uses too), each with its own learning rate (`learning_rate`, `vision_tower_lr`,
`mm_projector_lr`); weight matrices decay, norms, biases and other 1-D parameters do not.
"""

from __future__ import annotations

from typing import Sequence

from .config import TrainArgs
from .families import ModuleMap

COMPONENTS = ("llm", "vision", "merger")


def component_of(name: str, modules: ModuleMap) -> str:
    """llm | vision | merger for a parameter name, by the family's module map."""
    return modules.component_of(name)


def decays(name: str, shape: Sequence[int]) -> bool:
    """True for weight matrices; False for norms, biases and other 1-D parameters."""
    return len(shape) >= 2 and "norm" not in name


def component_lrs(args: TrainArgs) -> dict[str, float]:
    """The learning rate of each component; an unset rate falls back to learning_rate only."""
    lr = args.learning_rate
    return {
        "llm": lr,
        "vision": args.vision_tower_lr if args.vision_tower_lr is not None else lr,
        "merger": args.mm_projector_lr if args.mm_projector_lr is not None else lr,
    }
