"""One validation pass over a dataset: what `vltune data check` prints and what training runs before step 1.

Every sample is read, tokenised through the chat template and measured. Problems are counted per class
(`SampleError.kind`) with the offending sample ids and lines. Samples over `model_max_length` are
*dropped* (counted, not errors) unless `truncation_strategy: error` (with `right`, those that cannot be
cut cleanly are dropped, the others truncated); everything else is an *error*: a
run stops before step 1 unless `skip_bad_samples` is on, and `data check` exits non-zero.

`decode=False` (training's pre-flight) reads image headers only, so it costs about one tokenisation
per sample; `decode=True` (`data check`) decodes every image and video, so corrupt bodies show too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .dataset import SFTDataset
from .formats import SampleError

_HISTOGRAM_WIDTH = 40


@dataclass
class DataReport:
    """Counts and examples of one validation pass."""

    checked: int = 0
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lengths: list[int] = field(default_factory=list)
    images_per_sample: Counter = field(default_factory=Counter)
    videos_per_sample: Counter = field(default_factory=Counter)
    truncated: int = 0

    @property
    def n_errors(self) -> int:
        return sum(len(v) for v in self.errors.values())

    @property
    def n_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def summary(self) -> dict:
        """The counts, for run summaries and JSON output."""
        return {
            "samples_ok": len(self.lengths),
            "samples_with_errors": self.n_errors,
            "samples_dropped": self.n_dropped,
            "samples_truncated": self.truncated,
            "errors_by_kind": {k: len(v) for k, v in sorted(self.errors.items())},
            "dropped_by_kind": {k: len(v) for k, v in sorted(self.dropped.items())},
        }

    def format(self, max_examples: int = 5) -> str:
        """A report for people: problems per class with examples, a length histogram, media per sample."""
        lines = [
            f"checked {self.checked} sample(s): {len(self.lengths)} ok, {self.n_errors} with errors, "
            f"{self.n_dropped} dropped, {self.truncated} truncated"
        ]
        for title, table in (("errors", self.errors), ("dropped", self.dropped)):
            for kind, messages in sorted(table.items()):
                lines.append(f"{title} / {kind}: {len(messages)}")
                lines += [f"    {m}" for m in messages[:max_examples]]
                if len(messages) > max_examples:
                    lines.append(f"    ... and {len(messages) - max_examples} more")
        if self.lengths:
            lines.append(_histogram(np.asarray(self.lengths)))
        for name, counter in (("images", self.images_per_sample), ("videos", self.videos_per_sample)):
            if set(counter) - {0}:
                lines.append(f"{name} per sample: " + ", ".join(f"{k}: {counter[k]}" for k in sorted(counter)))
        return "\n".join(lines)


def _histogram(lengths: np.ndarray, bins: int = 8) -> str:
    counts, edges = np.histogram(lengths, bins=bins)
    peak = max(int(counts.max()), 1)
    rows = [f"tokens per sample: min {lengths.min()}, mean {lengths.mean():.0f}, max {lengths.max()}"]
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        rows.append(f"  {lo:8.0f}-{hi:<8.0f} {'#' * round(_HISTOGRAM_WIDTH * count / peak):<{_HISTOGRAM_WIDTH}} {count}")
    return "\n".join(rows)


def check_dataset(
    dataset: SFTDataset,
    read_problems: list[SampleError] = (),
    *,
    decode: bool = False,
    progress: Callable | None = None,
) -> tuple[DataReport, list[int]]:
    """Validate every sample of `dataset`; returns the report and the indices of the usable samples.

    `read_problems` are the problems met while reading the annotation files (they are errors too).
    """
    report = DataReport(checked=len(dataset) + len(read_problems))
    for problem in read_problems:
        report.errors[problem.kind].append(str(problem))
    keep = []
    indices = range(len(dataset))
    for i in progress(indices) if progress else indices:
        sample = dataset.samples[i]
        try:
            n_tokens, cut = dataset.check(i, decode)
        except SampleError as e:
            dropped = e.kind == "too_long" and dataset.truncation != "error"
            (report.dropped if dropped else report.errors)[e.kind].append(str(e))
            continue
        report.truncated += cut
        report.lengths.append(n_tokens)
        report.images_per_sample[len(sample.images)] += 1
        report.videos_per_sample[len(sample.videos)] += 1
        keep.append(i)
    return report, keep
