"""Every recipe key with its section, type, default and description, read from core/config.py itself.

The section dataclasses document each field with a string literal right under it (torchtitan's
attribute-docstring habit). Python keeps no such string at run time, so this module reads them from
the source with `ast`; `vltune keys`, `vltune train --help` and docs/recipe-keys.md all render the
same `recipe_keys()` list, and a test keeps the markdown file equal to `render_markdown()`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import textwrap
from dataclasses import MISSING, dataclass, fields

from . import config
from .recipe import suggestion

REGENERATE = "vltune keys --markdown > docs/recipe-keys.md"
"""The command that rewrites docs/recipe-keys.md (run from the repository root)."""


@dataclass(frozen=True)
class RecipeKey:
    """One flat recipe key, as documented in its section dataclass."""

    name: str
    section: str
    type: str
    """The annotation as written in core/config.py, e.g. `int | None`."""
    default: str
    """The default as a YAML value would spell it (`null`, `true`, `"runs/vltune"`, `1e-05`)."""
    doc: str
    """The field's docstring, whitespace collapsed; empty when it has none (a test forbids that)."""
    aliases: tuple[str, ...] = ()
    """Other recipes' names for this key (config.KEY_ALIASES), which a recipe may use instead."""


@functools.cache  # parsing the source costs ~40 ms a section; help, keys and the docs ask several times
def _docstrings(cls: type) -> tuple[str, dict[str, str]]:
    """The class docstring and {field name: docstring} from the source of `cls` (empty if unreadable)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source shipped: render without descriptions
        return "", {}
    node = tree.body[0]
    docs, body = {}, node.body
    for stmt, after in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = after.value.value
    return ast.get_docstring(node) or "", docs


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def section_docs() -> dict[str, str]:
    """Section name -> its dataclass's docstring (one line)."""
    return {name: _one_line(_docstrings(cls)[0]) for name, cls in config.SECTIONS.items()}


def recipe_keys(section: str | None = None) -> list[RecipeKey]:
    """Every recipe key in declaration order, section by section (or only `section`'s)."""
    keys = []
    for name, cls in config.SECTIONS.items():
        if section not in (None, name):
            continue
        _, docs = _docstrings(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            aliases = tuple(alias for alias, key in config.KEY_ALIASES.items() if key == f.name)
            keys.append(RecipeKey(f.name, name, annotation, _yaml_value(default), _one_line(docs.get(f.name, "")), aliases))
    return keys


def find(query: str) -> list[RecipeKey]:
    """The keys of section `query`, or the key named `query` (or one of its aliases); a ConfigError naming the
    valid choices otherwise."""
    if query in config.SECTIONS:
        return recipe_keys(query)
    keys = recipe_keys()
    match = [k for k in keys if query == k.name or query in k.aliases]
    if match:
        return match
    hint = suggestion(query, [k.name for k in keys] + list(config.KEY_ALIASES) + list(config.SECTIONS))
    raise config.ConfigError(f"{query!r} is neither a section ({', '.join(config.SECTIONS)}) nor a recipe key{hint}")


def render_text(keys: list[RecipeKey] | None = None, width: int = 100) -> str:
    """Plain text for a terminal: a heading per section, then `key: type = default` and its description."""
    keys = recipe_keys() if keys is None else keys
    about = section_docs()
    lines, section = [], None
    for key in keys:
        if key.section != section:
            section = key.section
            lines += [""] if lines else []
            lines.append(f"[{section}] {about[section]}".rstrip())
        lines.append(f"  {key.name}: {key.type} = {key.default}")
        lines += [f"      alias: {', '.join(key.aliases)}"] if key.aliases else []
        lines += textwrap.wrap(key.doc or "(no description)", width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/recipe-keys.md: one table per section (key, type, default, description)."""
    about = section_docs()
    out = [
        "# Recipe keys",
        "",
        f"<!-- Generated from core/config.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key below goes in a recipe YAML (`key: value`), in the dict given to `vltune.train`, or on the",
        "command line as `--key value` (`vltune train demo --learning_rate 2e-5`). Keys are flat: the section",
        "only groups them here. `vltune keys [SECTION|KEY]` prints the same list in a terminal. A key's aliases",
        "are other recipes' names for it (the Ovis training recipe's `model_path`, `data_path`, ...): a recipe may",
        "use either name, not both, and messages about the value use the name the recipe used.",
    ]
    for section in config.SECTIONS:
        out += ["", f"## {section}", ""]
        if about[section]:
            out += [about[section], ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for k in recipe_keys(section):
            also = "".join(f" (alias `{alias}`)" for alias in k.aliases)
            out.append(f"| `{k.name}`{also} | `{_cell(k.type)}` | `{_cell(k.default)}` | {_cell(k.doc)} |")
    return "\n".join(out) + "\n"
