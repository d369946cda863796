"""tools/gpu/scaling_summary.py: the arithmetic of issue 28's scaling summary (per GPU, efficiency, loss difference, vs stock)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "tools" / "gpu" / "scaling_summary.py"
_spec = importlib.util.spec_from_file_location("scaling_summary", _PATH)
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _rows(tokens_per_s, losses, peak=None, mfu=None):
    return [{"step": i + 1, "loss": loss, "tokens_per_s": t, **({"peak_mem_gib": peak[i]} if peak else {}),
             **({"mfu": mfu[i]} if mfu else {})} for i, (t, loss) in enumerate(zip(tokens_per_s, losses))]


def test_run_figures_drop_warmup_and_divide_by_gpus():
    rows = _rows([100.0, 800.0, 1000.0], [3.0, 2.0, 1.0], peak=[5.0, 7.5, 6.0], mfu=[0.1, 0.4, 0.5])
    fig = S.run_figures(rows, nproc=4, warmup=1)
    assert fig["tokens_per_s"] == 900.0  # mean of steps 2, 3: the warm-up step is left out
    assert fig["tokens_per_s_per_gpu"] == 225.0
    assert fig["mfu"] == 0.45
    assert fig["peak_mem_gib_per_gpu"] == 7.5  # the largest over all logged steps
    assert fig["losses"] == {"1": 3.0, "2": 2.0, "3": 1.0}
    assert S.run_figures([], 2, 1) == {"steps": 0}


def _record(item, run, engine, nproc, per_gpu, losses=None, exit=0):
    return {"item": item, "run": run, "engine": engine, "nproc": nproc, "exit": exit, "gpu_name": "H100", "gpu_count": 8,
            "tokens_per_s": None if per_gpu is None else per_gpu * nproc, "tokens_per_s_per_gpu": per_gpu,
            "losses": losses or {}}


def test_dp_efficiency_against_the_same_engines_one_gpu():
    records = [_record("dp3b", "f1", "fsdp", 1, 1000.0), _record("dp3b", "f8", "fsdp", 8, 930.0),
               _record("dp3b", "z1", "zero2", 1, 800.0), _record("dp3b", "z2", "zero2", 2, 880.0),
               _record("dp3b", "z8", "zero2", 8, None, exit=1)]
    out = S.summarize(records)["dp3b"]
    assert out["by_engine"]["fsdp"]["8"]["efficiency"] == pytest.approx(0.93)
    assert out["by_engine"]["fsdp"]["1"]["efficiency"] == 1.0
    assert out["by_engine"]["zero2"]["2"]["efficiency"] == pytest.approx(1.1)  # zero2's own 1-GPU rate, not fsdp's
    assert out["by_engine"]["zero2"]["8"]["efficiency"] is None  # failed
    assert out["efficiency_at_most_gpus"] == {"fsdp": {"nproc": 8, "efficiency": 0.93}, "zero2": {"nproc": 2, "efficiency": 1.1}}
    assert out["failed"] == ["z8"]
    assert S.efficiency(450.0, 500.0) == pytest.approx(0.9)


def test_loss_difference_against_the_reference_run():
    ref = {"1": 2.0, "2": 1.0, "3": 0.5}
    assert S.max_rel_loss_diff({"1": 2.02, "2": 0.99, "3": 0.5}, ref) == (pytest.approx(0.01), 3)
    assert S.max_rel_loss_diff({"2": 1.5, "9": 0.0}, ref) == (pytest.approx(0.5), 1)  # common steps only
    assert S.max_rel_loss_diff({"9": 1.0}, ref) == (None, 0)
    records = [_record("big", "single", "single", 1, 500.0, ref), _record("big", "fsdp8", "fsdp", 8, 400.0, {"1": 2.0, "2": 1.1, "3": 0.5})]
    out = S.summarize(records)["big"]
    assert out["reference"] == "single"
    assert out["runs"]["fsdp8"]["max_rel_loss_diff"] == pytest.approx(0.1)
    assert out["runs"]["fsdp8"]["loss_first_last"] == [2.0, 0.5]
    sp = S.summarize([_record("sp", "s4", "fsdp", 4, 100.0, {"1": 1.0})])["sp"]
    assert sp["reference"] is None and "unsharded" in sp["reference_missing"]


def test_moe_against_stock_per_gpu_and_last_line_wins(tmp_path):
    records = [_record("moe", "stock", "stock_fsdp2", 8, 999.0), _record("moe", "stock", "stock_fsdp2", 8, 1000.0),
               _record("moe", "fsdp", "fsdp", 8, 2500.0)]
    out = S.summarize(records)["moe"]
    assert out["stock_tokens_per_s_per_gpu"] == 1000.0
    assert out["runs"]["fsdp"]["vs_stock_per_gpu"] == 2.5
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "tokens_per_s": 10.0}) + "\n" + json.dumps({"eval_loss": 1.0}) + "\n")
    assert len(S.read_metrics(metrics)) == 1 and S.read_metrics(tmp_path / "none.jsonl") == []
