"""tools/peers/summary.py: the table of one peers call, and the fp8-against-bf16 loss comparison (`--loss-curve`) of issue 26."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "tools" / "peers" / "summary.py"
_spec = importlib.util.spec_from_file_location("peer_summary", _PATH)
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _run(path: Path, losses: list[float]) -> Path:
    path.write_text(json.dumps({"windows": [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]}))
    return path


def test_loss_curves_give_the_largest_per_step_difference(tmp_path):
    bf16 = _run(tmp_path / "train_speed_vltune-bf16.json", [12.0, 11.0, 10.0, 8.0])
    fp8 = _run(tmp_path / "train_speed_vltune-fp8.json", [12.0, 11.11, 9.95, 8.0])
    result = S.loss_curves(bf16, fp8)
    assert result["steps"] == 4 and result["worst_step"] == 2
    assert result["max_rel_diff"] == pytest.approx(0.01)  # 0.11 / 11: the largest, not the last or the mean
    assert result["mean_loss"] == [10.25, pytest.approx(10.265)]
    assert result["first_last"] == [[12.0, 8.0], [12.0, 8.0]]
    with pytest.raises(ValueError, match="logged different steps"):
        S.loss_curves(bf16, _run(tmp_path / "short.json", [12.0, 11.0]))


def test_the_command_writes_loss_curve_json(tmp_path):
    _run(tmp_path / "train_speed_vltune-bf16.json", [2.0, 1.0])
    _run(tmp_path / "train_speed_vltune-fp8.json", [2.02, 1.0])
    subprocess.run([sys.executable, str(_PATH), str(tmp_path), "--loss-curve", "vltune-bf16", "vltune-fp8"], check=True,
                   capture_output=True)
    written = json.loads((tmp_path / "loss_curve.json").read_text())
    assert written["reference"] == "vltune-bf16" and written["other"] == "vltune-fp8"
    assert written["max_rel_diff"] == pytest.approx(0.01) and written["worst_step"] == 1


def _vltune(path: Path, tokens_per_s: float) -> None:
    path.write_text(json.dumps({"tokens_per_s": tokens_per_s, "mfu": 0.4, "peak_mem_gib": 60.0, "keys": {"fp8": "true"},
                                "windows": [{"step": 4, "loss": 11.0}, {"step": 20, "loss": 9.0}]}))


def test_the_table_compares_each_tool_with_the_faster_peer_and_vltune_bf16(tmp_path):
    _vltune(tmp_path / "train_speed_vltune-bf16.json", 10000.0)
    _vltune(tmp_path / "train_speed_vltune-fp8.json", 13000.0)
    # ms-swift: steps 1..10 of 8192 tokens, 1 s each; timed after the warm-up step 8: 2 steps in 2 s
    (tmp_path / "ms-swift.jsonl").write_text("\n".join(json.dumps({"step": s, "t": float(s), "tokens": 8192, "peak_gib": 50.0})
                                                     for s in range(1, 11)) + "\n" + json.dumps({"loss": 11.9}) + "\n")
    (tmp_path / "ms-swift.meta.json").write_text(json.dumps([{"setting": "packing", "rc": 0, "wall_s": 9, "command": "swift"}]))
    (tmp_path / "llamafactory.meta.json").write_text(json.dumps([{"setting": "packing", "rc": 1, "wall_s": 9, "command": "lf"}]))
    subprocess.run([sys.executable, str(_PATH), str(tmp_path), "--warmup", "8"], check=True, capture_output=True)
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["ms-swift"]["tokens_per_s"] == 8192.0 and table["ms-swift"]["mfu"] == 0.3277  # 0.4 * 8192 / 10000
    assert table["vltune-bf16"]["vs_faster_peer"] == pytest.approx(1.22)  # 10000 / 8192
    assert table["vltune-fp8"]["vs_vltune_bf16"] == 1.3 and table["ms-swift"]["vs_vltune_bf16"] == pytest.approx(0.82)
    assert "tokens_per_s" not in table["llamafactory"]  # a failed peer is listed with its tries, not timed
    assert "| vltune-fp8 | fp8=true | 13000.0 | 0.4 | 1.59 | 1.3 |" in (tmp_path / "table.md").read_text()
