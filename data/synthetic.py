"""Deterministic synthetic VQA data for smoke-testing and debugging fine-tuning.

Real VQA sets are large and noisy, which makes it hard to tell a broken training
loop from a hard task. These images (coloured shapes on muted backgrounds) have
one-word answers from small, fixed vocabularies, so a working fine-tune should
move accuracy clearly above the known chance level within a few hundred steps.

Everything is derived from ``SyntheticVQAConfig.seed`` through per-sample numpy
generators, so the same config always yields byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("color", "shape", "count", "position")

# Saturated or extreme colours: each has at least one channel <= 60 or >= 220, so
# none can coincide with a background pixel (all channels kept in [100, 210]).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("1", "2", "3", "4")

# Muted grey / beige tints; a gradient and light noise are added on top.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (150, 150, 150), (170, 165, 150), (135, 140, 145), (185, 175, 160), (125, 125, 120),
)
_BG_MIN, _BG_MAX = 100, 210

ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "position": POSITIONS,
}

# Several phrasings per task so the model cannot key on one exact string.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {kind}?", "What is the color of the {kind}?",
              "Which color does the {kind} have?"),
    "shape": ("What shape is in the image?", "What shape is the {color} object?",
              "Name the shape shown in the picture."),
    "count": ("How many {kinds} are there?", "How many {kinds} can you see?",
              "Count the {kinds} in the image."),
    "position": ("Where is the {kind}?", "In which part of the image is the {kind}?",
                 "Where is the {color} {kind} located?"),
}

_SPLIT_KEYS = {"train": 0, "eval": 1}  # distinct random streams per split
# Shape bounding box as a fraction of the side. A lone shape is drawn large (it must span several
# 14-16 px patches for a small vision tower to see its outline); quadrant tasks keep shapes inside
# one quadrant.
_MIN_SIZE_FRAC = 0.30
_SINGLE_SIZE_FRAC = (0.45, 0.80)
_GENERATOR_VERSION = 2  # bump when the images/questions change, to invalidate caches


@dataclass
class SyntheticVQAConfig:
    num_train: int = 2000
    num_eval: int = 200
    image_size: int = 112
    tasks: tuple[str, ...] = ("color",)
    seed: int = 0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)  # accept lists (e.g. from YAML/JSON)
        validate_tasks(self.tasks)
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError("num_train and num_eval must be >= 0")


def validate_tasks(tasks: tuple[str, ...] | list[str]) -> None:
    """Raise ValueError for an empty task list or any unknown task name."""
    if not tasks:
        raise ValueError(f"at least one task is required; valid tasks: {list(TASKS)}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown synthetic VQA task {task!r}; valid tasks: {list(TASKS)}")


def _plural(kind: str) -> str:
    return kind + "es" if kind.endswith(("s", "x", "ss")) else kind + "s"


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Muted tint with a gentle vertical gradient and light noise, so the model
    cannot rely on a flat background, while staying far from every palette colour."""
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    slope = rng.uniform(-12.0, 12.0)
    gradient = np.linspace(-slope, slope, size, dtype=np.float32)[:, None, None]
    noise = rng.integers(-6, 7, size=(size, size, 3)).astype(np.float32)
    pixels = np.clip(base + gradient + noise, _BG_MIN, _BG_MAX).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float],
                color: tuple[int, int, int]) -> None:
    """Draw ``kind`` filling the square ``box`` (x0, y0, x1, y1) without
    anti-aliasing, so shape pixels carry the exact palette colour."""
    x0, y0, x1, y1 = box
    s = x1 - x0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif kind == "star":
        outer, inner = s / 2, s / 2 * 0.45
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        draw.polygon(points, fill=color)
    elif kind == "cross":
        t = s / 6  # half thickness of each bar
        draw.rectangle((cx - t, y0, cx + t, y1), fill=color)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=color)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _box_in_region(rng: np.random.Generator, region: tuple[int, int, int, int],
                   size: int) -> tuple[float, float, float, float]:
    """Random square box of side ``size`` fully inside ``region`` (with a 1px margin)."""
    rx0, ry0, rx1, ry1 = region
    x0 = rng.integers(rx0 + 1, max(rx0 + 2, rx1 - size - 1))
    y0 = rng.integers(ry0 + 1, max(ry0 + 2, ry1 - size - 1))
    return (float(x0), float(y0), float(x0 + size - 1), float(y0 + size - 1))


def _quadrants(image_size: int) -> list[tuple[int, int, int, int]]:
    """Regions in POSITIONS order: top left, top right, bottom left, bottom right."""
    h = image_size // 2
    return [(0, 0, h, h), (h, 0, image_size, h), (0, h, h, image_size), (h, h, image_size, image_size)]


def _shape_size(rng: np.random.Generator, image_size: int, max_frac: float, min_frac: float = _MIN_SIZE_FRAC) -> int:
    """Side in pixels, >= 30% of the image so shapes stay visible at small resolutions."""
    lo = math.ceil(min_frac * image_size)
    hi = max(lo, int(max_frac * image_size))
    return int(rng.integers(lo, hi + 1))


def make_sample(rng: np.random.Generator, task: str, image_size: int) -> tuple[Image.Image, str, str]:
    """Draw one (image, question, answer) triple for ``task`` using only ``rng``."""
    validate_tasks((task,))
    image = _background(rng, image_size)
    draw = ImageDraw.Draw(image)
    kind = SHAPES[rng.integers(len(SHAPES))]
    color_name = tuple(COLORS)[rng.integers(len(COLORS))]
    color = COLORS[color_name]

    if task in ("color", "shape"):
        size = _shape_size(rng, image_size, _SINGLE_SIZE_FRAC[1], _SINGLE_SIZE_FRAC[0])
        _draw_shape(draw, kind, _box_in_region(rng, (0, 0, image_size, image_size), size), color)
        answer = color_name if task == "color" else kind
    elif task == "count":
        # One shape per distinct quadrant keeps them non-overlapping by construction.
        count = int(rng.integers(1, 5))
        cells = rng.choice(4, size=count, replace=False)
        quadrants = _quadrants(image_size)
        for cell in sorted(int(c) for c in cells):
            size = _shape_size(rng, image_size, 0.40)
            _draw_shape(draw, kind, _box_in_region(rng, quadrants[cell], size), color)
        answer = COUNTS[count - 1]
    else:  # position: the whole shape lies inside one quadrant, so the answer is unambiguous
        cell = int(rng.integers(4))
        size = _shape_size(rng, image_size, 0.42)
        _draw_shape(draw, kind, _box_in_region(rng, _quadrants(image_size)[cell], size), color)
        answer = POSITIONS[cell]

    templates = QUESTION_TEMPLATES[task]
    question = templates[rng.integers(len(templates))].format(
        kind=kind, kinds=_plural(kind), color=color_name)
    return image, question, answer


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator per (seed, split, index): a sample never depends on how
    many samples came before it, and train/eval draw from disjoint streams."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(_SPLIT_KEYS[split], index)))


def _write_split(out_dir: Path, split: str, num: int, config: SyntheticVQAConfig) -> Path:
    """Render ``num`` samples, cycling through the tasks so they stay balanced."""
    lines = []
    for i in range(num):
        task = config.tasks[i % len(config.tasks)]
        image, question, answer = make_sample(_sample_rng(config.seed, split, i), task, config.image_size)
        sample_id = f"{split}_{i:05d}"
        rel_image = f"images/{sample_id}.png"
        image.save(out_dir / rel_image, format="PNG")
        lines.append(json.dumps({
            "id": sample_id,
            "image": rel_image,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "task": task,
        }))
    path = out_dir / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _manifest(config: SyntheticVQAConfig) -> dict:
    info = asdict(config)
    info["tasks"] = list(config.tasks)
    return {"generator_version": _GENERATOR_VERSION, "config": info}


def _is_complete(out_dir: Path, config: SyntheticVQAConfig) -> bool:
    """True if a previous run with the identical config left all of its files."""
    info_path = out_dir / "dataset_info.json"
    try:
        if json.loads(info_path.read_text(encoding="utf-8")) != _manifest(config):
            return False
    except (OSError, ValueError):
        return False
    if not ((out_dir / "train.jsonl").is_file() and (out_dir / "eval.jsonl").is_file()):
        return False
    return all((out_dir / "images" / f"{split}_{i:05d}.png").is_file()
               for split, num in (("train", config.num_train), ("eval", config.num_eval))
               for i in range(num))


def generate_vqa_dataset(out_dir: str | Path, config: SyntheticVQAConfig) -> dict:
    """Write LLaVA-format ``train.jsonl``/``eval.jsonl`` plus PNGs under ``out_dir``.

    Skips the work when ``dataset_info.json`` records the same config and all files
    exist; the manifest is written last so an interrupted run is never mistaken for
    a finished one.
    """
    validate_tasks(config.tasks)
    out_dir = Path(out_dir)
    result = {
        "train_file": str(out_dir / "train.jsonl"),
        "eval_file": str(out_dir / "eval.jsonl"),
        "data_path": str(out_dir),
        "num_train": config.num_train,
        "num_eval": config.num_eval,
        "tasks": list(config.tasks),
    }
    if _is_complete(out_dir, config):
        return result
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset_info.json").unlink(missing_ok=True)
    _write_split(out_dir, "train", config.num_train, config)
    _write_split(out_dir, "eval", config.num_eval, config)
    (out_dir / "dataset_info.json").write_text(
        json.dumps(_manifest(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return result
