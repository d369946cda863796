"""The family conformance suite: every test here runs once per registered family (core/families).

A family added to the registry is covered without editing a test: `family` is parametrized over
`FAMILIES` at collection time.
"""

from __future__ import annotations

import pytest

from vltune.core.families import FAMILIES


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", sorted(FAMILIES), scope="module")


@pytest.fixture(scope="module")
def spec(family):
    return FAMILIES[family]


@pytest.fixture(scope="module")
def model_dir(tiny_models, family):
    return tiny_models[family]


@pytest.fixture(scope="module")
def torch_model(model_dir):
    pytest.importorskip("torch")
    from vltune.backends.torch.models import load_model

    return load_model(model_dir).eval()
