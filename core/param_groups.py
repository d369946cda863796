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
from .train_modules import Selection

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


UNLISTED = "unlisted"
"""The group of trainable parameters outside every listed train_modules module (`lora_modules_to_save`)."""


def group_lrs(args: TrainArgs, selection: Selection | None) -> dict[str, float]:
    """The learning rate of each group label: by component, or with train_modules by listed module."""
    if selection is None:
        return component_lrs(args)
    lrs = {e.label: selection.lr_of(e, args.learning_rate) for e in selection.entries}
    lrs[UNLISTED] = args.learning_rate
    return lrs


def group_label(name: str, modules: ModuleMap, selection: Selection | None) -> str:
    """The group a trainable parameter joins (before the decay split): its component, or with
    train_modules the listed module it trains as. Both backends' build_param_groups use this rule."""
    if selection is None:
        return component_of(name, modules)
    entry = selection.entry_of(name)
    return entry.label if entry is not None else UNLISTED
