"""The two engines mirror each other file for file, and backends.engine is the one way into either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vltune.backends import ENGINES, engine_name

ROOT = Path(__file__).resolve().parents[3] / "backends"
SHARED = ("engine", "parallel", "distributed", "launch", "checkpoint", "optim", "loss", "lora", "generate", "mdlm",
          "attention", "models/__init__", "models/entry")
"""Each job has one file name in both engines; torch adds batch, bench, convert, speed, fp8 (torchao's float8), tiny and linear_attention
(packed rows through Qwen3.5's Gated DeltaNet; MindSpore has no Qwen3.5 model yet)."""


def _top_level(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_same_files_for_the_same_jobs():
    for name in ENGINES:
        missing = [f for f in SHARED if not (ROOT / name / f"{f}.py").exists()]
        assert not missing, (name, missing)


@pytest.mark.parametrize(("part", "names"), [
    ("parallel", {"build_backend"}),
    ("generate", {"InferenceEngine", "generate", "generate_greedy"}),
    ("loss", {"token_loss_sum", "weighted_loss_sum"}),
    ("models/__init__", {"load_model"}),
    ("models/entry", {"model_entry"}),
    ("distributed", {"DistContext", "init_distributed"}),
])
def test_same_entry_points_in_both_engines(part, names):
    for name in ENGINES:
        assert names <= _top_level(ROOT / name / f"{part}.py"), (name, part, names - _top_level(ROOT / name / f"{part}.py"))


def test_engine_names():
    assert engine_name("ms") == engine_name("mindspore") == "mindspore" and engine_name("torch") == "torch"
    with pytest.raises(ValueError, match="expected one of torch, mindspore"):
        engine_name("jax")
