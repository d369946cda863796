"""A recipe's data, read and validated: shared by `vltune train` (before step 1) and `vltune data check`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.config import RecipeConfig
from .dataset import SFTDataset
from .registry import load_registry, read_dataset_use
from .validate import DataReport, check_dataset


class DataValidationError(ValueError):
    """The recipe's data has errors and `skip_bad_samples` is off; the message is the full report."""


def video_overrides(cfg: RecipeConfig) -> dict:
    d = cfg.data
    return {
        "video_min_pixels": d.video_min_pixels, "video_max_pixels": d.video_max_pixels, "base_interval": d.base_interval,
        "video_min_frames": d.video_min_frames, "video_max_frames": d.video_max_frames,
    }


def build_dataset(
    cfg: RecipeConfig,
    spec: str,
    *,
    limit: int | None = None,
    decode: bool = False,
    strict: bool = True,
    progress: Callable | None = None,
    key: str = "dataset_use",
) -> tuple[SFTDataset, DataReport]:
    """Read `spec` (dataset_use syntax), validate every sample, keep the usable ones.

    With `strict`, raises DataValidationError with the report when errors remain and skip_bad_samples
    is off, or when no sample is left (training); `data check` passes strict=False and prints the report
    itself. `key` names the recipe key `spec` came from, in those errors.
    """
    registry = load_registry(cfg.data.datasets, cfg.data.dataset_registry)
    read = read_dataset_use(spec, registry, seed=cfg.train.seed)
    dataset = SFTDataset(
        read.samples[:limit], Path(cfg.model.model_name_or_path), max_length=cfg.data.model_max_length,
        min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
        truncation=cfg.data.truncation_strategy, video_overrides=video_overrides(cfg),
    )
    report, keep = check_dataset(dataset, read.problems, decode=decode, progress=progress)
    if strict and report.n_errors and not cfg.data.skip_bad_samples:
        raise DataValidationError(
            f"{key} {spec}: {report.n_errors} bad sample(s); fix them or set skip_bad_samples: true\n{report.format()}"
        )
    if strict and not keep:
        raise DataValidationError(f"{key} {spec}: {_nothing_left(report)}\n{report.format()}")
    dataset.samples = [dataset.samples[i] for i in keep]
    return dataset, report


def _nothing_left(report: DataReport) -> str:
    """Why no sample survived validation, with the counts by reason and what to change."""
    if not report.checked:
        return "no sample left: the file(s) hold no samples"
    reasons = [f"{len(v)} dropped as {k}" for k, v in sorted(report.dropped.items())]
    reasons += [f"{len(v)} skipped for {k}" for k, v in sorted(report.errors.items())]
    fixes = []
    if "too_long" in report.dropped:
        fixes.append("raise model_max_length, lower max_pixels or set truncation_strategy: right")
    if report.errors:
        fixes.append("fix the samples listed below (`vltune data check` lists them all)")
    return f"no sample left of {report.checked}: {', '.join(reasons)}; {' and '.join(fixes)}"
