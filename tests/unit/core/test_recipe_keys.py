"""Every recipe key is documented (type, default, description) and docs/recipe-keys.md is current."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from vltune.cli import main
from vltune.core.config import SECTIONS, TrainArgs
from vltune.core.recipe_keys import REGENERATE, find, recipe_keys, render_markdown, section_docs

DOC = Path(__file__).resolve().parents[3] / "docs" / "recipe-keys.md"


def test_every_key_of_every_section_has_a_description():
    keys = recipe_keys()
    assert [k.name for k in keys] == [f.name for cls in SECTIONS.values() for f in fields(cls)]
    undocumented = [f"{k.section}.{k.name}" for k in keys if not k.doc]
    assert not undocumented, f"write a docstring under each of these fields in core/config.py: {undocumented}"
    assert all(section_docs().values()), "every section dataclass in core/config.py needs a class docstring"


def test_type_default_and_docstring_come_from_the_dataclass():
    (lr,) = find("learning_rate")
    assert (lr.section, lr.type, lr.default) == ("train", "float", repr(TrainArgs.learning_rate))
    assert lr.doc.startswith("Learning rate of the language model")
    (limit,) = find("save_total_limit")
    assert (limit.type, limit.default) == ("int | None", "null")
    (out,) = find("output_dir")
    assert out.default == '"runs/vltune"'
    assert {k.section for k in find("mdlm")} == {"mdlm"}


def test_docs_file_is_generated_from_the_code():
    assert DOC.exists() and DOC.read_text() == render_markdown(), (
        f"{DOC.name} is out of date with core/config.py: regenerate it with `{REGENERATE}` (from the repository root)"
    )


def test_keys_command_and_train_help_list_the_keys(capsys):
    assert main(["keys", "train"]) == 0
    out = capsys.readouterr().out
    assert "  learning_rate: float = 1e-05\n      Learning rate of the language model" in out
    assert "model_name_or_path" not in out  # another section's
    assert main(["keys", "learning_rat"]) == 1
    assert "did you mean 'learning_rate'?" in capsys.readouterr().err
    assert main(["keys", "--markdown"]) == 0 and capsys.readouterr().out == render_markdown()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    missing = [k.name for k in recipe_keys() if f"\n  {k.name}: {k.type} = {k.default}\n" not in help_text]
    assert not missing, missing
