"""The long video row of issue 28's sequence-parallel run (tools/gpu/scaling.sh sp).

    python3 tools/gpu/scaling_assets.py video --dir DIR --frames 500 --size 512 --rows 8

Writes DIR/long.mp4 (FRAMES frames of SIZE x SIZE, mpeg4 at 25 fps, a moving gradient as
data/synthetic_corpus.py's videos) and DIR/train.jsonl with ROWS copies of one sample: the video and a
short question and answer. With video_min_frames = video_max_frames = FRAMES and video_max_pixels at least
FRAMES x SIZE^2, every frame is kept at full size: a Qwen3-VL (16-px patches, 2 x 2 merge, 2 frames per
temporal patch) row holds FRAMES / 2 x (SIZE / 32)^2 video tokens (500 frames of 512 px: 64,000).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vltune.data.synthetic_corpus import write_gradient_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    video = sub.add_parser("video")
    video.add_argument("--dir", required=True)
    video.add_argument("--frames", type=int, default=500)
    video.add_argument("--size", type=int, default=512)
    video.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    write_gradient_video(out / "long.mp4", args.frames, args.size, args.size, fps=25.0, frames_per_radian=7)
    record = {"video": "long.mp4", "conversations": [
        {"from": "human", "value": "<video>\nDescribe how the colours move across the frames."},
        {"from": "gpt", "value": "A smooth colour gradient drifts slowly from left to right in every frame of the clip."}]}
    (out / "train.jsonl").write_text("".join(json.dumps({"id": f"long-{i}", **record}) + "\n" for i in range(args.rows)))


if __name__ == "__main__":
    main()
