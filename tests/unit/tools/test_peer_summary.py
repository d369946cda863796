"""tools/peers/summary.py: the fp8-against-bf16 loss comparison of issue 26 (`--loss-curve`)."""

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
