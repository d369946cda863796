"""Every data test fetches URLs into a cache of its own: never the user's ~/.cache, never a stale copy
left by another test whose server had the same port."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _url_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLTUNE_CACHE", str(tmp_path / "vltune-cache"))
