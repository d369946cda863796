"""The model-family registry: config.json's `model_type` -> its FamilySpec.

Every module of this package that defines `SPEC` is a family file (spec.py and chat_templates.py are
the building blocks); they are found by listing the package, so adding a family is adding its file here (plus one model entry per backend
under backends/<engine>/models/). Nothing outside these places names a family: whitelists, CLI
choices and capability checks all come from `FAMILIES`.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

from .spec import Capabilities, FamilySpec, attention_layer_indices, MediaRule, ModelInfo, ModelShape, ModuleMap, PositionRule, TokenIds


class UnknownFamilyError(ValueError):
    """A model_type vltune has no spec for; the message lists the supported families."""


class BrokenConfigError(ValueError):
    """A model directory's config.json that cannot be read as a JSON object; the message names the file."""


def _discover() -> dict[str, FamilySpec]:
    found = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        spec = getattr(importlib.import_module(f"{__name__}.{module}"), "SPEC", None)
        if spec is None:  # spec.py, chat_templates.py: the building blocks
            continue
        if spec.name != module:
            raise RuntimeError(f"core/families/{module}.py defines the spec of {spec.name!r}; the file must be named after it")
        found[spec.name] = spec
    return found


FAMILIES: dict[str, FamilySpec] = _discover()

DEFAULT_FAMILY = "qwen2_5_vl"
"""The family of the demo and of tools that build a tiny model when given none."""


def family_names(capability: str | None = None) -> tuple[str, ...]:
    """The supported model_types, optionally only those with a capability flag set (e.g. "mindspore")."""
    return tuple(name for name, spec in FAMILIES.items() if capability is None or getattr(spec.capabilities, capability))


def get_family(model_type: str | None, where: str = "model_type") -> FamilySpec:
    """The spec of `model_type`, or an error naming `where` and listing the supported families."""
    spec = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise UnknownFamilyError(f"{where}: {model_type!r} is not a model family vltune supports "
                                 f"(supported: {', '.join(FAMILIES)})")
    return spec


def read_config(model_dir: str | Path) -> dict:
    """config.json of an HF-format model directory, with clear errors for a missing or broken file."""
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json (is this an HF-format model directory?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BrokenConfigError(f"{path}: not valid JSON ({e}); the file is damaged or was cut short: copy it again "
                                "from the model's source (the hub repository or the training run that wrote it)") from None
    if not isinstance(config, dict):
        raise BrokenConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def family_of_config(config: dict, where: str = "config.json") -> FamilySpec:
    return get_family(config.get("model_type"), f"{where} model_type")


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """What data/ needs to know about a model directory (its family's config reader)."""
    config = read_config(model_dir)
    spec = family_of_config(config, str(Path(model_dir) / "config.json"))
    try:
        return spec.info(config)
    except KeyError as e:
        raise ValueError(f"{Path(model_dir) / 'config.json'}: missing key {e.args[0]!r} that {spec.name} configs carry") from None


def all_shapes() -> dict[str, ModelShape]:
    """Every released shape of every family, by name (`vltune bench --model-shape`)."""
    shapes: dict[str, ModelShape] = {}
    for spec in FAMILIES.values():
        for name, shape in spec.shapes.items():
            if name in shapes:
                raise RuntimeError(f"shape {name!r} is defined by {shapes[name].model_type} and {spec.name}")
            shapes[name] = shape
    return shapes


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Capabilities", "attention_layer_indices", "FamilySpec", "MediaRule", "ModelInfo", "ModelShape", "ModuleMap", "PositionRule",
           "TokenIds", "UnknownFamilyError", "all_shapes", "family_names", "family_of_config", "get_family", "read_config",
           "read_model_info"]
