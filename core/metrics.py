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
    """Appends one JSON object per logged step to OUTPUT_DIR/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.time(), 3), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
