"""train_modules on the MindSpore backend (Qwen families only): the torch backend's freezing and groups."""

from __future__ import annotations

import pytest

ms = pytest.importorskip("mindspore")

from vltune.backends.mindspore.engine import apply_freeze  # noqa: E402
from vltune.backends.mindspore.models import load_model  # noqa: E402
from vltune.backends.mindspore.optim import build_param_groups  # noqa: E402
from vltune.core.config import ModelArgs, TrainArgs  # noqa: E402
from vltune.core.families import get_family  # noqa: E402


def test_merger_and_llm_with_their_rates(tiny_qwen2_5_vl):
    model = load_model(tiny_qwen2_5_vl)
    selection = apply_freeze(model, ModelArgs(train_modules="merger:1e-4|llm"))
    names = [n for n, _ in model.parameters_and_names()]
    trainable = {n for n, p in model.parameters_and_names() if p.requires_grad}
    assert trainable == {n for n in names if n.startswith("model.visual.merger.") or not n.startswith("model.visual.")}
    groups = build_param_groups([(n, p) for n, p in model.parameters_and_names() if p.requires_grad],
                                get_family("qwen2_5_vl").modules, TrainArgs(learning_rate=1e-3), selection)
    assert {g.name: g.base_lr for g in groups} == {"merger": 1e-4, "merger_no_decay": 1e-4, "llm": 1e-3, "llm_no_decay": 1e-3}
    assert apply_freeze(model, ModelArgs()) is None  # the flags again: no selection
    groups = build_param_groups([(n, p) for n, p in model.parameters_and_names() if p.requires_grad],
                                get_family("qwen2_5_vl").modules, TrainArgs(learning_rate=1e-3))
    assert {g.name for g in groups} == {"llm", "llm_no_decay", "merger", "merger_no_decay"}
