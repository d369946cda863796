"""`train_modules` (the Ovis recipe's key): which modules train, each with its own learning rate.

Syntax, as Ovis's train.py reads it: `all`, or `|`-separated module names, each with an optional
`:LR` (`llm|vte:1e-5`, `visual_tokenizer.head:2e-5|llm`). Everything else is frozen; a module without
its own rate trains at `learning_rate`.

A name is, in this order:
  * a family alias (`FamilySpec.train_modules_table`: Ovis2.5's own names, or `all` / `llm` / `vision` /
    `merger` derived from the module map), which stands for one or more module paths;
  * an alias followed by a dotted path inside it, as Ovis writes `llm.layers.31`: the rest is resolved
    under the alias's first module (`llm.layers.31` -> `model.language_model.layers.31`);
  * a dotted module path from the HF model root (`model.language_model.layers.3`, `lm_head`).
A path segment `-1` is the last index of that module list (`model.vision_tower.layers.-1`). An alias
path starting with `!` is carved out of the alias (Qwen's `vision` excludes its merger).

Which selected module a parameter belongs to is decided by the longest selected path that is a prefix of
its name (an alias's carve-out only takes names out of that alias), so `all|vte:1e-5` trains the table at 1e-5 and the rest at
`learning_rate`. Parameter names may be peft-wrapped (`base_model.model.` prefix, `modules_to_save.default`,
`base_layer` inside): they are matched as the module they wrap.

The syntax is checked at recipe load (`parse`), names against the family when it is known
(`name_problems`), and paths against the model when it is loaded (`Selection.resolve`). Backend-neutral:
the standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ConfigError

KEY = "train_modules"
EXCLUDE = "!"
"""Prefix of an alias path that is carved out of the alias (never written by users)."""
LAST = "-1"
"""A path segment meaning "the last index of this module list"."""

_PEFT_PREFIX = "base_model.model."
_PEFT_INNER = re.compile(r"\.(?:modules_to_save\.default|original_module|base_layer)(?=\.|$)")


@dataclass(frozen=True)
class TrainModule:
    """One `|`-separated item of train_modules: the name as written and its own learning rate (or None)."""

    name: str
    lr: float | None = None


def parse(text: str) -> list[TrainModule]:
    """The items of a train_modules value; a ConfigError naming the item for an empty name, a bad or
    non-positive learning rate or a name given twice."""
    items, seen = [], set()
    for raw in str(text).split("|"):
        item = raw.replace(" ", "")
        name, sep, lr_text = item.partition(":")
        if not name:
            raise ConfigError(f"{KEY}: {text!r} has an empty module name (in {raw!r}); write e.g. llm|vte:1e-5")
        lr = None
        if sep:
            try:
                lr = float(lr_text)
            except ValueError:
                raise ConfigError(f"{KEY}: {item!r}: {lr_text!r} is not a learning rate; write NAME:LR, e.g. vte:1e-5") from None
            if not (math.isfinite(lr) and lr > 0):
                raise ConfigError(f"{KEY}: {item!r}: the learning rate must be a finite number > 0")
        if name in seen:
            raise ConfigError(f"{KEY}: {name!r} is listed twice in {text!r}; list each module once")
        seen.add(name)
        items.append(TrainModule(name, lr))
    return items


def expand(name: str, aliases: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The module paths (from the HF model root) a train_modules name stands for."""
    if name in aliases:
        return aliases[name]
    for alias in sorted(aliases, key=len, reverse=True):  # `visual_tokenizer.vit.x` before `visual_tokenizer.x`
        if name.startswith(alias + ".") and aliases[alias]:
            base = next((p for p in aliases[alias] if not p.startswith(EXCLUDE)), "")
            rest = name[len(alias) + 1:]
            return (f"{base}.{rest}" if base else rest,)
    return (name,)


def name_problems(text: str, aliases: dict[str, tuple[str, ...]], roots: Iterable[str], family: str) -> list[str]:
    """Names that can be neither an alias nor a path of the family's models (whose top-level module names
    are `roots`); paths are checked in full once the model is loaded."""
    try:
        items = parse(text)
    except ConfigError as e:
        return [str(e)]
    roots = set(roots)
    problems = []
    for item in items:
        paths = [p.lstrip(EXCLUDE) for p in expand(item.name, aliases)]
        if all(p == "" or p.split(".")[0] in roots for p in paths):
            continue
        problems.append(
            f"{KEY}: {item.name!r} is neither a module name of {family} ({', '.join(aliases)}) nor a module path of its "
            f"models (paths start with {' or '.join(sorted(roots))}, e.g. {sorted(roots)[0]}.…)"
        )
    return problems


def plain_name(name: str) -> str:
    """A parameter or module name as the unwrapped model names it (peft's wrappers cut out)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return _PEFT_INNER.sub("", name)


def _covers(path: str, name: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


def _last_index(path: str, names: list[str]) -> str:
    """`path` with each `-1` segment replaced by the largest index found there among `names`."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part != LAST:
            continue
        prefix = ".".join(parts[:i])
        indices = [int(seg) for n in names if n.startswith(prefix + ".") and (seg := n[len(prefix) + 1:].split(".")[0]).isdigit()]
        if not indices:
            return path  # the existence check names it
        parts[i] = str(max(indices))
    return ".".join(parts)


@dataclass(frozen=True)
class Entry:
    """One selected module: its label (the name as written), its own lr, its resolved paths and carve-outs."""

    label: str
    lr: float | None
    paths: tuple[str, ...]
    excluded: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selection:
    """A train_modules value resolved against one model's module and parameter names."""

    entries: tuple[Entry, ...]

    @classmethod
    def resolve(cls, text: str, aliases: dict[str, tuple[str, ...]], names: Iterable[str]) -> "Selection":
        """Resolve `text` against the model's module and parameter `names` (plain or peft-wrapped); a
        ConfigError names the key, the item and the path that the model does not have."""
        names = sorted({plain_name(n) for n in names})
        entries = []
        for item in parse(text):
            paths, excluded = [], []
            for raw in expand(item.name, aliases):
                path = _last_index(raw.lstrip(EXCLUDE), names)
                if raw.startswith(EXCLUDE):
                    excluded.append(path)
                    continue
                if not any(_covers(path, n) for n in names):
                    tops = sorted({n.split(".")[0] for n in names})
                    raise ConfigError(f"{KEY}: {item.name!r} -> {path!r}: the model has no such module "
                                     f"(its top-level modules: {', '.join(tops)})")
                paths.append(path)
            entries.append(Entry(item.name, item.lr, tuple(paths), tuple(excluded)))
        paths = [p for e in entries for p in e.paths]
        for path in set(paths):
            owners = [e.label for e in entries if path in e.paths]
            if len(owners) > 1:
                raise ConfigError(f"{KEY}: {' and '.join(repr(o) for o in owners)} both select {path or 'the whole model'!r}; "
                                 "list each module once")
        return cls(tuple(entries))

    def entry_of(self, name: str) -> Entry | None:
        """The selected module `name` (a parameter's name, plain or peft-wrapped) trains as, or None (frozen):
        the entry with the longest covering path. An entry's carve-out of at least that length takes the
        name out of that entry only (Qwen's `all|vision` still trains the merger, as part of `all`)."""
        name = plain_name(name)
        best, best_len = None, -1
        for entry in self.entries:
            length = max((len(p) for p in entry.paths if _covers(p, name)), default=-1)
            if length < 0 or any(_covers(p, name) and len(p) >= length for p in entry.excluded):
                continue
            if length > best_len:
                best, best_len = entry, length
        return best

    def lr_of(self, entry: Entry, learning_rate: float) -> float:
        return entry.lr if entry.lr is not None else learning_rate

    def paths(self) -> list[str]:
        return [p for e in self.entries for p in e.paths]
