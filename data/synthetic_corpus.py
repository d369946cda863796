"""A synthetic corpus with every sample format vltune reads, for parity tests, packing and benchmarks.

`write_format_corpus` writes images (several sizes, RGB / RGBA / L / P / CMYK, EXIF-rotated JPEGs),
short MPEG-4 videos (PyAV) and annotation files in both layouts:

* LLaVA `conversations` JSONL and OpenAI `messages` JSON (string content with tags, or content parts
  with inline media paths);
* single image, multi-image, video, text-only, multi-turn, system prompts, grounding answers (Qwen2.5-VL
  style JSON boxes), `<think>` reasoning answers.

Each record's kind is in its id (`single-7`, `video-3`, ...), so a failing comparison names it.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("single", "multi", "video", "text", "multiturn", "system", "grounding", "think", "parts", "image_video")
_MODES = ("RGB", "RGBA", "L", "P", "CMYK", "EXIF")


def _image(rng: np.random.Generator, path: Path, mode: str) -> Path:
    width, height = (int(x) for x in rng.integers(40, 420, size=2))
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(ramp * rng.uniform(0.2, 1, size=(1, 1, 3)) + rng.normal(0, 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "EXIF":  # stored sideways with an orientation tag, as phones do
        exif = Image.Exif()
        exif[0x0112] = int(rng.choice([3, 6, 8]))
        path = path.with_suffix(".jpg")
        image.save(path, exif=exif, quality=92)
        return path
    if mode == "RGBA":
        alpha = Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8))
        image = image.convert("RGBA")
        image.putalpha(alpha)
    elif mode in ("L", "P", "CMYK"):
        image = image.convert(mode)
    path = path.with_suffix(".jpg" if mode == "CMYK" else ".png")
    image.save(path)
    return path


def write_gradient_video(path: Path, frames: int, width: int, height: int, fps: float, frames_per_radian: float = 3) -> Path:
    """An mpeg4 clip of a colour gradient whose phase moves one radian every `frames_per_radian` frames
    (even width and height)."""
    import av  # PyAV, the decoder data/video.py uses

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        x = np.linspace(0, 1, width)[None, :, None]
        for t in range(frames):
            shade = np.clip(255 * (0.5 + 0.5 * np.sin(6 * x + t / frames_per_radian + np.arange(3)[None, None, :])), 0, 255)
            frame = np.broadcast_to(shade, (height, width, 3)).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def _video(rng: np.random.Generator, path: Path) -> Path:
    frames = int(rng.integers(8, 40))
    width, height = (int(x) // 2 * 2 for x in rng.integers(48, 200, size=2))
    fps = float(rng.choice([10.0, 12.0, 24.0, 25.0]))
    return write_gradient_video(path, frames, width, height, fps)


def _llava(sample_id: str, turns: list[tuple[str, str]], images=(), videos=()) -> dict:
    record: dict = {"id": sample_id, "conversations": [{"from": role, "value": text} for role, text in turns]}
    if images:
        record["image"] = list(images) if len(images) > 1 else images[0]
    if videos:
        record["video"] = videos[0]
    return record


def write_format_corpus(out_dir: str | Path, num_samples: int = 200, seed: int = 0, with_videos: bool = True) -> list[Path]:
    """Write the corpus into `out_dir`; returns the annotation files (a JSONL and a JSON)."""
    out = Path(out_dir)
    (out / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = [k for k in KINDS if with_videos or "video" not in k]
    llava, openai = [], []
    for i in range(num_samples):
        kind = kinds[i % len(kinds)]
        sid = f"{kind}-{i}"

        def image(j: int = 0) -> str:
            mode = _MODES[(i + j) % len(_MODES)]
            return _image(rng, out / "media" / f"{sid}-{j}", mode).name

        def video() -> str:
            return _video(rng, out / "media" / f"{sid}.mp4").name

        q = f"Question {i}: what do you see?"
        if kind == "single":
            llava.append(_llava(sid, [("human", f"<image>\n{q}"), ("gpt", f"Answer {i}.")], [f"media/{image()}"]))
        elif kind == "multi":
            names = [f"media/{image(j)}" for j in range(2)]
            llava.append(_llava(sid, [("human", f"Compare <image> and <image>. {q}"), ("gpt", "They differ.")], names))
        elif kind == "video":
            llava.append(_llava(sid, [("human", f"<video>\nWhat happens in the video {i}?"), ("gpt", "Stripes move.")], videos=[f"media/{video()}"]))
        elif kind == "text":
            llava.append(_llava(sid, [("human", q), ("gpt", "Nothing, there is no picture.")]))
        elif kind == "multiturn":
            llava.append(_llava(sid, [("human", f"<image>\n{q}"), ("gpt", "A gradient."), ("human", "And the assistant thinks?"), ("gpt", "Still a gradient.")], [f"media/{image()}"]))
        elif kind == "system":
            llava.append(_llava(sid, [("system", "You are a terse assistant."), ("human", f"<image>{q}"), ("gpt", "Grain.")], [f"media/{image()}"]))
        elif kind == "grounding":
            box = [int(v) for v in sorted(rng.integers(0, 300, size=4))]
            answer = json.dumps([{"bbox_2d": box, "label": "bright area"}])
            llava.append(_llava(sid, [("human", "<image>\nLocate the bright area, output its bbox coordinates using JSON format."), ("gpt", f"```json\n{answer}\n```")], [f"media/{image()}"]))
        elif kind == "think":
            openai.append({"id": sid, "messages": [
                {"role": "user", "content": f"<image>{q}"},
                {"role": "assistant", "content": f"<think>\nThe left is dark, the right is light.\n</think>\n\nA gradient ({i})."},
            ], "images": [f"media/{image()}"]})
        elif kind == "parts":
            openai.append({"id": sid, "messages": [
                {"role": "system", "content": "Describe precisely."},
                {"role": "user", "content": [{"type": "image", "image": f"media/{image(0)}"}, {"type": "text", "text": q}, {"type": "image", "image": f"media/{image(1)}"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Two gradients."}]},
            ]})
        elif kind == "image_video":
            openai.append({"id": sid, "messages": [
                {"role": "user", "content": [{"type": "video", "video": f"media/{video()}"}, {"type": "image", "image": f"media/{image()}"}, {"type": "text", "text": "Same colours?"}]},
                {"role": "assistant", "content": "Yes."},
            ]})
    jsonl, json_file = out / "llava.jsonl", out / "openai.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in llava))
    json_file.write_text(json.dumps(openai, indent=1))
    return [jsonl, json_file]
