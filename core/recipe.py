"""Reading a recipe: a YAML file, a bundled recipe's name or a dict, plus flat command-line overrides,
routed into the section dataclasses of core/config.py, coerced to each key's declared type, then
checked by core/recipe_rules.py. Every problem is reported at once, unknown keys with the closest
valid one. Other recipes' names for a key (`KEY_ALIASES`: the Ovis recipe's `model_path`, `data_path`, ...)
are read as that key, and messages about its value name it as the recipe wrote it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields
from pathlib import Path
from collections.abc import Iterable
from typing import Any, get_type_hints

import yaml

from .config import KEY_ALIASES, RECIPE_DIR, SECTIONS, ConfigError, ModelArgs, RecipeConfig, base_model_type
from .families import FAMILIES
from .recipe_rules import validate


def _key_index() -> dict[str, tuple[str, type]]:
    """Flat key -> (section name, annotated type)."""
    index = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            index[f.name] = (section, hints[f.name])
    return index


def _coerce(value: Any, annotated: Any) -> Any:
    """Turn a command-line string into the annotated type (YAML values are already typed)."""
    if not isinstance(value, str):
        if annotated is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    targets = getattr(annotated, "__args__", (annotated,))
    if value.lower() in ("none", "null") and type(None) in targets:
        return None
    for target in targets:
        if target is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        elif target in (int, float):
            try:
                return target(value)
            except ValueError:
                continue
        elif target is dict:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict):
                return parsed
        elif target is str:
            return value
    return value


def _type_ok(value: Any, annotated: Any) -> bool:
    targets = getattr(annotated, "__args__", (annotated,))
    for target in targets:
        if target is type(None) and value is None:
            return True
        if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if target is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if target in (str, bool, dict, list) and isinstance(value, target):
            return True
    return False


def resolve_recipe_path(recipe: str) -> Path:
    """A YAML path, or the name of a bundled recipe (`demo` -> recipes/demo.yaml)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"recipe file {recipe!r} does not exist")
        if path.is_dir():
            raise ConfigError(f"recipe {recipe!r} is a directory: give a recipe's YAML file (or a bundled recipe's name)")
        return path
    bundled = RECIPE_DIR / f"{recipe}.yaml"
    if bundled.exists():
        return bundled
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown recipe {recipe!r}: not a file and not a bundled recipe ({', '.join(names)})")


def load_recipe(recipe: str | os.PathLike | dict | None, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Build a validated RecipeConfig from a recipe (path, bundled name or dict) plus flat overrides."""
    if recipe is None:
        raw: dict[str, Any] = {}
    elif isinstance(recipe, dict):
        raw = dict(recipe)
    else:
        path = resolve_recipe_path(str(recipe))
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path}: expected a mapping of keys to values, got {type(raw).__name__}")
    index = _key_index()
    raw, written, problems = canonical_keys(raw)
    over, over_written, over_problems = canonical_keys(overrides or {})  # a command-line key overrides either name
    for key in over:
        written.pop(key, None)
    raw.update(over)
    written.update(over_written)
    problems += over_problems
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in raw.items():
        if key not in index:
            problems.append(f"unknown key {key!r}{suggestion(key, list(index) + list(KEY_ALIASES))}")
            continue
        section, annotated = index[key]
        value = _coerce(value, annotated)
        if not _type_ok(value, annotated):
            problems.append(f"{written.get(key, key)}: {value!r} is not a valid {getattr(annotated, '__name__', annotated)}")
            continue
        values[section][key] = value
    if problems:
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(problems))

    cfg = RecipeConfig(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    _tiny_follows_model_type(cfg.model)
    try:
        validate(cfg, given=frozenset(raw))
    except ConfigError as e:
        raise ConfigError(_as_written(str(e), written)) from None
    return cfg


def canonical_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """`raw` with every alias (KEY_ALIASES) renamed to its key, {key: the alias written} for the renamed
    ones, and a problem for each key given under two names."""
    out: dict[str, Any] = {}
    written: dict[str, str] = {}
    problems = []
    for name, value in raw.items():
        key = KEY_ALIASES.get(name, name)
        if key in out:
            first = written.get(key, key)
            problems.append(f"{first} and {name} are both given; they are the same key ({key}): keep one")
            continue
        out[key] = value
        if key != name:
            written[key] = name
    return out, written, problems


def _as_written(message: str, written: dict[str, str]) -> str:
    """A validation message with each problem about an aliased key naming the alias the recipe used."""
    for key, alias in written.items():
        message = re.sub(rf"(?m)^(  - ){re.escape(key)}\b", rf"\g<1>{alias} ({key})", message)
    return message


def _read_yaml(path: Path) -> Any:
    """The recipe's YAML; a syntax error names the recipe file and line (PyYAML's own says "<unicode string>")."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        reason = " ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part) or str(e)
        raise ConfigError(f"recipe {where}: not valid YAML ({reason}); check the indentation and quoting there") from None


def suggestion(key: str, index: Iterable[str]) -> str:
    """"; did you mean 'x'?" for an unknown key. Among near-equal matches a training key comes first: a user who
    types `per_device_batch_size` means the training batch, though the shorter eval key scores a little higher."""
    scored = sorted(((difflib.SequenceMatcher(None, key, known).ratio(), known) for known in index), reverse=True)
    close = [known for ratio, known in scored if ratio >= 0.6 and ratio >= scored[0][0] - 0.05]
    close.sort(key=lambda known: "eval" in known and "eval" not in key)  # stable: ratio order otherwise
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" + (f" (or {close[1]!r})" if len(close) > 1 else "")


def _tiny_follows_model_type(m: ModelArgs) -> None:
    """With `make_tiny_model`, a `model_type` of another known family picks the tiny model's family."""
    if not (m.make_tiny_model and m.model_type):
        return
    wanted = base_model_type(m.model_type)
    if wanted == m.make_tiny_model or wanted not in FAMILIES:
        return
    m.model_name_or_path = str(Path(m.model_name_or_path).parent / f"tiny-{wanted}")
    m.make_tiny_model = wanted
