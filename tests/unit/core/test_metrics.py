"""metrics.jsonl of a run that was killed mid-write: the torn row goes, with a line saying so, and the
resumed run appends to rows that all parse."""

from __future__ import annotations

import json

from vltune.core.metrics import MetricsWriter


def test_a_torn_last_line_is_dropped_on_resume_and_said(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "loss": 0.1')  # killed mid-write
    writer = MetricsWriter(path, resume_step=4, tensorboard=False)
    writer.write({"step": 5, "loss": 0.3})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    assert f"{path}: dropped 1 torn line(s) (line 6)" in out
    assert (tmp_path / "loss.png").exists()
