"""`vltune bench data`: how fast the data pipeline turns JPEG samples into model-ready features.

Measures the work a training data loader does per sample (JPEG decode, EXIF, resize, normalise,
patchify, chat-template rendering, tokenisation, label mask) with N worker processes, each building
features for its share of the samples, as a DataLoader's workers would. Reports samples/s and tokens/s
per worker count; the first pass over a few samples is discarded (imports, caches).
"""

from __future__ import annotations

import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import SFTDataset
from .formats import load_samples
from .malloc import reuse_freed_buffers

_WORKER: dict = {}


def write_jpeg_corpus(out_dir: str | Path, num_samples: int, image_size: tuple[int, int], seed: int = 0) -> Path:
    """`num_samples` one-image VQA samples with distinct JPEG photos-like images (smooth + noise)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = image_size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    rows = []
    for i in range(num_samples):
        base = ramp * rng.uniform(0.2, 1.0, size=(1, 1, 3)) + rng.uniform(0, 80, size=(1, 1, 3))
        noise = rng.normal(0, 20, size=(height, width, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        name = f"images/{i:05d}.jpg"
        Image.fromarray(pixels).save(out_dir / name, quality=90)
        rows.append({
            "id": f"s{i}", "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the colours of this picture in one sentence."},
                {"from": "gpt", "value": "A smooth gradient with fine grain, brighter towards the right edge."},
            ],
        })
    annotation = out_dir / "bench.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return annotation


def _init(annotation: str, model_dir: str) -> None:
    reuse_freed_buffers()
    _WORKER["dataset"] = SFTDataset(load_samples(annotation), model_dir, max_length=1 << 20)


def _build(indices: list[int]) -> int:
    dataset = _WORKER["dataset"]
    return sum(len(dataset[i].input_ids) for i in indices)


def measure(annotation: Path, model_dir: Path, workers: int) -> dict:
    """samples/s and tokens/s of building every sample of `annotation` with `workers` processes."""
    n = len(load_samples(annotation))
    chunks = [list(range(start, n, workers)) for start in range(workers)]
    with get_context("fork").Pool(workers, initializer=_init, initargs=(str(annotation), str(model_dir))) as pool:
        pool.map(_build, [[i] for i in range(min(workers * 2, n))])  # warm-up
        start = time.perf_counter()
        tokens = sum(pool.map(_build, chunks))
        seconds = time.perf_counter() - start
    return {"workers": workers, "samples": n, "seconds": round(seconds, 3),
            "samples_per_s": round(n / seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def run_data_bench(
    work_dir: str | Path,
    model_dir: str | Path,
    *,
    image_size: tuple[int, int] = (448, 448),
    num_samples: int = 300,
    workers: list[int] = (1, 2),
) -> dict:
    """Write the JPEG corpus (once per size) and time the pipeline for each worker count."""
    corpus = Path(work_dir) / f"{image_size[0]}x{image_size[1]}-{num_samples}"
    annotation = corpus / "bench.jsonl"
    if not annotation.exists():
        write_jpeg_corpus(corpus, num_samples, image_size)
    return {
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "cpu_count": os.cpu_count(),
        "model": str(model_dir),
        "results": [measure(annotation, Path(model_dir), w) for w in workers],
    }
