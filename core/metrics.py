"""Run metrics that both backends log the same way: metrics.jsonl rows and exact-match scoring."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any


def normalize_answer(text: str) -> str:
    """Lower-case, trim and drop trailing punctuation, so "Red." matches "red"."""
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.rstrip(".!?。 ")


def exact_match(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


class MetricsWriter:
    """One JSON object per logged step in OUTPUT_DIR/metrics.jsonl, the same scalars as TensorBoard
    events under OUTPUT_DIR/tensorboard/, and loss.png redrawn after every evaluation.

    A resumed run appends (rows past the resume step are dropped first, so the file tells one story; so
    is a torn line, the half-written row of a run killed or stopped by a full disk, and it says so).
    """

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line, row in _read_rows(self.path, repair=True) if row["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.events = None
        if tensorboard:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.events = EventFileWriter(str(self.path.parent / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.time(), 3), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.events is not None:
            self._write_events(row)
        if any(key.startswith("eval_") for key in row):
            plot_losses(self.path, self.path.parent / "loss.png")

    def _write_events(self, row: dict[str, Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=("eval/" if k.startswith("eval_") else "train/") + k, simple_value=float(v))
            for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self.events.add_event(event_pb2.Event(wall_time=row["time"], step=row["step"], summary=summary_pb2.Summary(value=values)))
        self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        plot_losses(self.path, self.path.parent / "loss.png")


def _read_rows(path: Path, repair: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every readable row of a metrics.jsonl. Unreadable lines are skipped; with `repair`
    (the caller rewrites the file without them) a line says how many went, and which."""
    rows, torn = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append((line, row))
                continue
        except ValueError:
            pass
        torn.append(number)
    if torn and repair:
        print(f"[vltune] {path}: dropped {len(torn)} torn line(s) (line {', '.join(map(str, torn))}), the unfinished "
              "write of a run that was killed or ran out of disk", flush=True)
    return rows


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Training loss per logged step and eval loss per evaluation, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, row in _read_rows(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if train and min(v for _, v in train) > 0 else "linear")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
