"""Tests for vltune.data.video.

References, strongest first: transformers' own video processors (``test_matches_transformers_video_processor``,
needs torchvision, so it runs on the GPU machine); transformers' source functions executed as they are
(smart_resize, sample_frames, _calculate_timestamps, VideoMetadata.sampled_fps -- loaded from the
installed files without importing torchvision); torch's uint8 ``interpolate`` (the kernel torchvision's
resize calls) plus a step-by-step torch copy of the processors' ``_preprocess``; and the official
qwen-vl-finetune sampling lines, restated here. Pixel comparisons are ``np.array_equal``: the numpy
code repeats the reference arithmetic, so any difference at all is a bug.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from vltune.data.video import (
    VideoClip,
    VideoConfig,
    VideoLoadError,
    decode_frames,
    fps_frame_indices,
    interval_frame_indices,
    load_video,
    patch_timestamps,
    preprocess_video,
    probe_video,
    resize_bicubic_aa,
    sample_frame_indices,
    second_per_grid_t,
    smart_resize_qwen3_video,
    video_resize_target,
)

try:
    import av
except ImportError:  # decoding tests skip; the pixel tests need no decoder
    av = None

QWEN2 = VideoConfig(processor="Qwen2VLVideoProcessor", min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
QWEN3 = VideoConfig(
    processor="Qwen3VLVideoProcessor", patch_size=16, min_pixels=4096, max_pixels=16 * 32 * 32 * 8,
    image_mean=(0.5,) * 3, image_std=(0.5,) * 3, fps=2.0,
)


def _write_video(path: Path, frames: int, width: int, height: int, fps: float, codec: str = "mpeg4", options=None) -> Path:
    """A synthetic clip: a moving gradient plus noise (noise stresses bicubic overshoot and clamping)."""
    rng = np.random.default_rng(frames * 7 + width)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ramp = np.linspace(0, 200, width)[None, :, None]
        for i in range(frames):
            img = (ramp + 6 * i + rng.integers(0, 56, (height, width, 3))).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    if av is None:
        pytest.skip("PyAV is not installed")
    d = tmp_path_factory.mktemp("videos")
    return {
        "mpeg4": _write_video(d / "a.mp4", 75, 64, 48, 25),  # 3 s
        "x264": _write_video(d / "b.mp4", 75, 320, 240, 30, "libx264"),  # 2.5 s
        "webm": _write_video(d / "c.webm", 30, 96, 64, 10, "libvpx-vp9"),  # header has no frame count
        "short": _write_video(d / "short.mp4", 3, 64, 48, 25),
        "one": _write_video(d / "one.mp4", 1, 64, 48, 25),
        "faststart": _write_video(d / "fs.mp4", 50, 64, 48, 25, options={"movflags": "faststart"}),
    }


def _all_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# --- transformers' source, executed without importing torchvision ---------------------------------


def _transformers_function(relpath: str, name: str, cls: str | None = None):
    """Compile one function (or method) from the installed transformers source file."""
    root = Path(importlib.util.find_spec("transformers").origin).parent
    tree = ast.parse((root / relpath).read_text())
    scope = tree.body
    if cls is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    namespace = {"math": math, "np": np, "logger": types.SimpleNamespace(warning_once=lambda *a, **k: None)}
    exec(compile(ast.Module(body=[node], type_ignores=[]), relpath, "exec"), namespace)
    return namespace[name]


# --- sampling -------------------------------------------------------------------------------------


def _official_interval_indices(total_frames: int, avg_fps: float, interval: float, min_frames: int, max_frames: int):
    """qwen-vl-finetune's data_qwen.py (Qwen2.5-VL era), ``video_decord``, line by line."""
    video_length = total_frames / avg_fps
    num_frames_to_sample = round(video_length / interval)
    target_frames = min(max(num_frames_to_sample, min_frames), max_frames)
    frame_idx = np.linspace(0, total_frames - 1, target_frames, dtype=int)
    return np.unique(frame_idx)


def test_interval_sampling_matches_qwen_vl_finetune():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        total = int(rng.integers(1, 5000))
        fps = float(rng.choice([10, 12.5, 24, 25, 29.97002997002997, 30, 60]))
        interval = float(rng.choice([0.25, 0.5, 1, 2, 3, 4]))
        lo = int(rng.integers(1, 9))
        hi = int(rng.integers(lo, 64))
        ours = interval_frame_indices(total, fps, interval, lo, hi)
        assert np.array_equal(ours, _official_interval_indices(total, fps, interval, lo, hi))


def test_interval_sampling_documented_example():
    # 10 s at 30 fps, base_interval 2 -> round(5) = 5 frames inside [4, 8]
    idx = interval_frame_indices(300, 30.0, 2.0, 4, 8)
    assert idx.tolist() == [0, 74, 149, 224, 299]
    assert second_per_grid_t(len(idx), 300, 30.0, 2) == pytest.approx(2 / (5 / 10))


def test_fps_sampling_matches_transformers_qwen3():
    from transformers.video_utils import VideoMetadata

    sample_frames = _transformers_function("models/qwen3_vl/video_processing_qwen3_vl.py", "sample_frames", "Qwen3VLVideoProcessor")
    rng = np.random.default_rng(1)
    for _ in range(800):
        total = int(rng.integers(2, 6000))
        fps = float(rng.choice([10, 24, 25, 29.97002997002997, 30, 60]))
        target = float(rng.choice([0.5, 1, 2, 4]))
        lo, hi = int(rng.integers(1, 9)), int(rng.integers(8, 800))
        proc = types.SimpleNamespace(fps=target, min_frames=lo, max_frames=hi)
        expected = sample_frames(proc, VideoMetadata(total_num_frames=total, fps=fps))
        assert np.array_equal(fps_frame_indices(total, fps, target, lo, hi), expected)
        cfg = VideoConfig(processor="Qwen3VLVideoProcessor", fps=target, min_frames=lo, max_frames=hi)
        assert np.array_equal(sample_frame_indices(total, fps, cfg), expected)


def test_time_values_match_transformers():
    from transformers.video_utils import VideoMetadata

    timestamps = _transformers_function("models/qwen3_vl/processing_qwen3_vl.py", "_calculate_timestamps", "Qwen3VLProcessor")
    rng = np.random.default_rng(2)
    for _ in range(500):
        total = int(rng.integers(4, 3000))
        fps = float(rng.choice([10, 24, 25, 29.97002997002997, 30]))
        idx = np.unique(rng.integers(0, total, int(rng.integers(1, 40))))
        meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=idx)
        assert second_per_grid_t(len(idx), total, fps, 2) == 2 / meta.sampled_fps  # Qwen2_5_VLProcessor
        assert patch_timestamps(idx, fps, 2) == timestamps(None, idx, fps, 2)


# --- decoding -------------------------------------------------------------------------------------


def test_probe_and_decode_match_sequential_pyav(videos):
    assert probe_video(videos["mpeg4"]) == (75, 25.0)
    assert probe_video(videos["x264"]) == (75, 30.0)
    assert probe_video(videos["webm"]) == (30, 10.0)  # counted from packets: the WebM header has none
    with av.open(str(videos["webm"])) as c:
        assert c.streams.video[0].frames == 0
    for name in ("mpeg4", "x264", "webm"):
        everything = _all_frames(videos[name])
        idx = [0, 3, 4, len(everything) - 1]
        assert np.array_equal(decode_frames(videos[name], idx), everything[idx])
    assert np.array_equal(decode_frames(videos["mpeg4"].read_bytes(), [2, 5]), _all_frames(videos["mpeg4"])[[2, 5]])


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2_5_vl", "qwen3_vl"])
def test_load_video_samples_the_family_rule(videos, cfg):
    clip = load_video(videos["x264"], cfg)
    expected = sample_frame_indices(75, 30.0, cfg)
    assert np.array_equal(clip.frame_indices, expected)
    assert np.array_equal(clip.frames, _all_frames(videos["x264"])[expected])
    assert clip.frames.dtype == np.uint8 and clip.frames.shape[1:] == (240, 320, 3)
    assert (clip.fps, clip.total_frames) == (30.0, 75)
    assert clip.timestamps == [i / 30.0 for i in expected]


# --- resize ----------------------------------------------------------------------------------------


def _resize_cases(seed: int, count: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    cases = [(48, 64, 28, 56), (48, 64, 112, 140), (240, 320, 224, 308), (97, 61, 112, 56), (30, 500, 56, 1456), (40, 40, 40, 20)]
    cases += [tuple(int(v) for v in rng.integers(4, 300, 4)) for _ in range(count)]
    return cases


def _frames_for(h: int, w: int, seed: int, t: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:  # hard edges: maximal overshoot, exercises the clamp
        return (rng.integers(0, 2, (t, h, w, 3)) * 255).astype(np.uint8)
    return ((rng.integers(0, 256, (t, h, w, 3)) + np.linspace(0, 255, w)[None, None, :, None]) / 2).astype(np.uint8)


def test_resize_is_bit_exact_with_torch_uint8_antialias_bicubic():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    for seed, (h, w, oh, ow) in enumerate(_resize_cases(0, 40)):
        frames = _frames_for(h, w, seed)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        expected = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
        assert expected.dtype == torch.uint8
        assert np.array_equal(resize_bicubic_aa(frames, oh, ow), expected.permute(0, 2, 3, 1).numpy()), (h, w, oh, ow)


_KERNEL_CHECK = """
import sys
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, TEST_DIR)
from test_video import _frames_for, _resize_cases
from vltune.data.frame_resize import resize_bicubic_aa
bad = 0
for seed, (h, w, oh, ow) in enumerate(_resize_cases(1, 25)):
    f = _frames_for(h, w, seed)
    ref = F.interpolate(torch.from_numpy(f).permute(0, 3, 1, 2).contiguous(), size=(oh, ow), mode="bicubic", antialias=True)
    bad += int((resize_bicubic_aa(f, oh, ow) != ref.permute(0, 2, 3, 1).numpy()).sum())
print(torch.backends.cpu.get_cpu_capability(), bad)
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_resize_matches_every_torch_cpu_kernel(capability):
    """ATen picks a different uint8 kernel per CPU (generic C++, AVX2 intrinsics); all must agree with us."""
    pytest.importorskip("torch")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    script = f"TEST_DIR = {str(Path(__file__).parent)!r}\n" + _KERNEL_CHECK
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [capability.upper(), "0"], out.stdout


# --- preprocessing ---------------------------------------------------------------------------------


def _torch_video_processor(frames: np.ndarray, cfg: VideoConfig) -> tuple[np.ndarray, list[int]]:
    """transformers' Qwen2VL/Qwen3VL ``_prepare_input_videos`` + ``_preprocess`` for one video, step by
    step in torch, with torchvision's uint8 CPU resize written as the interpolate call it makes."""
    import torch
    import torch.nn.functional as F

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # [T, C, H, W] uint8
    t, c, h, w = video.shape
    oh, ow = video_resize_target(t, h, w, cfg)
    if (oh, ow) != (h, w):
        video = F.interpolate(video, size=[oh, ow], mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)  # _fuse_mean_std_and_rescale_factor
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    video = video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))  # tvF.normalize
    videos = video[None]
    tps, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -t % tps:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    gt, gh, gw = videos.shape[1] // tps, oh // p, ow // p
    patches = videos.view(1, gt, tps, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(gt * gh * gw, c * tps * p * p).numpy(), [gt, gh, gw]


def _clip(frames: np.ndarray, fps: float = 25.0) -> VideoClip:
    return VideoClip(frames, np.arange(len(frames)) * 3, fps, 3 * len(frames))


CAPPED = [
    VideoConfig(processor="Qwen2VLVideoProcessor", min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28, cap_pixels_per_frame=True, max_video_tokens=60),
    VideoConfig(processor="Qwen3VLVideoProcessor", patch_size=16, min_pixels=4096, max_pixels=64 * 32 * 32 * 8, fps=2.0,
                image_mean=(0.5,) * 3, image_std=(0.5,) * 3, cap_pixels_per_frame=True, max_video_tokens=12),
]


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3, *CAPPED], ids=["qwen2_5_vl", "qwen3_vl", "qwen2_5_vl_capped", "qwen3_vl_capped"])
def test_preprocess_matches_torch_reimplementation(cfg):
    pytest.importorskip("torch")
    # (frames, height, width): odd counts (padded by repeating the last frame), up- and downscaling,
    # a side below the patch factor (Qwen3 scales it up first), extreme aspect.
    shapes = [(4, 48, 64), (5, 240, 320), (3, 20, 100), (2, 700, 90), (6, 33, 47)]
    for seed, (t, h, w) in enumerate(shapes):
        frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        pixel_values, grid, _, _ = preprocess_video(_clip(frames), cfg)
        expected, expected_grid = _torch_video_processor(frames, cfg)
        assert grid.dtype == np.int64 and grid.tolist() == expected_grid
        assert pixel_values.dtype == np.float32 and pixel_values.shape == expected.shape
        assert np.array_equal(pixel_values, expected), (cfg.processor, t, h, w)
    if cfg.cap_pixels_per_frame:  # the cap must bind somewhere, or this case tests nothing new
        uncapped = VideoConfig(**{**cfg.__dict__, "cap_pixels_per_frame": False})
        assert any(video_resize_target(*s, cfg) != video_resize_target(*s, uncapped) for s in shapes)


def test_smart_resize_qwen3_video_matches_transformers():
    reference = _transformers_function("models/qwen3_vl/video_processing_qwen3_vl.py", "smart_resize")
    rng = np.random.default_rng(3)
    for _ in range(3000):
        t = int(rng.integers(2, 64))
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        lo, hi = int(rng.choice([4096, 128 * 32 * 32])), int(rng.choice([768 * 32 * 32, 25165824, 16 * 32 * 32 * 8]))
        try:
            expected = reference(t, h, w, 2, 32, lo, hi)
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize_qwen3_video(t, h, w, 2, 32, lo, hi)
            continue
        assert smart_resize_qwen3_video(t, h, w, 2, 32, lo, hi) == expected


def test_preprocess_token_count_and_time(videos):
    clip = load_video(videos["mpeg4"], QWEN2)  # 3 s at 25 fps: round(1.5) = 2 -> raised to min 4 frames
    pixel_values, grid, spt, stamps = preprocess_video(clip, QWEN2)
    assert clip.frame_indices.tolist() == [0, 24, 49, 74]
    assert grid.tolist() == [2, 4, 4]  # smart_resize(48, 64) -> 56 x 56 with min_pixels 56*56
    assert pixel_values.shape == (int(np.prod(grid)), 3 * 2 * 14 * 14)
    # transformers' sampled_fps expression; the exact 1.5 of len/(N/fps) is one ulp away
    assert spt == 2 / (4 / 75 * 25.0) and abs(spt - 1.5) < 1e-12
    assert stamps == [(0 / 25 + 24 / 25) / 2, (49 / 25 + 74 / 25) / 2]


# --- transformers' real processors (torchvision required: runs on the GPU machine) --------------------


def test_matches_transformers_video_processor():
    """transformers' real processors on the same uint8 frames (synthetic, so PyAV is not needed here)."""
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    def supported(cls, **kwargs):  # cap_pixels_per_frame exists from transformers 5.2x on
        return {k: v for k, v in kwargs.items() if k in cls.valid_kwargs.__annotations__}

    qwen2_dict = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "temporal_patch_size": 2,
                  "merge_size": 2, "image_mean": list(QWEN2.image_mean), "image_std": list(QWEN2.image_std)}
    qwen3_dict = {"size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16, "temporal_patch_size": 2,
                  "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "fps": 2, "min_frames": 4,
                  "max_frames": 768, "do_sample_frames": True}
    pairs = []
    for cap in (False, True):
        flags = supported(Qwen2VLVideoProcessor, cap_pixels_per_frame=cap, max_video_tokens=300)
        if cap and not flags:
            continue
        q2 = VideoConfig.from_preprocessor_config({**qwen2_dict, **flags}, "qwen2_5_vl")
        pairs.append((Qwen2VLVideoProcessor(**qwen2_dict, **flags), q2))
        flags = supported(Qwen3VLVideoProcessor, cap_pixels_per_frame=cap, max_video_tokens=12)
        q3 = VideoConfig.from_preprocessor_config({**qwen3_dict, **flags}, "qwen3_vl")
        pairs.append((Qwen3VLVideoProcessor(**qwen3_dict, **flags), q3))
    pairs.append((Qwen2VLVideoProcessor(min_pixels=QWEN2.min_pixels, max_pixels=QWEN2.max_pixels,
                                        **supported(Qwen2VLVideoProcessor, cap_pixels_per_frame=False)), QWEN2))
    for seed, (t, h, w) in enumerate([(4, 48, 64), (5, 240, 320), (3, 20, 100), (8, 360, 640), (2, 700, 90)]):
        frames = _frames_for(h, w, seed, t)
        for proc, cfg in pairs:
            out = proc(videos=[frames], do_sample_frames=False, return_tensors="np")
            pixel_values, grid, _, _ = preprocess_video(_clip(frames), cfg)
            assert np.array_equal(np.asarray(out["video_grid_thw"])[0], grid), (cfg, t, h, w)
            assert np.array_equal(np.asarray(out["pixel_values_videos"]), pixel_values), (cfg, t, h, w)

    # Qwen3 end to end: the processor samples all frames with its own rule and reports the indices
    qwen3, qwen3_cfg = pairs[1]
    every = _frames_for(72, 96, 5, 75)
    out = qwen3(videos=[every], video_metadata=[VideoMetadata(total_num_frames=75, fps=25.0)],
                do_sample_frames=True, return_metadata=True, return_tensors="np")
    indices = sample_frame_indices(75, 25.0, qwen3_cfg)
    pixel_values, grid, _, stamps = preprocess_video(VideoClip(every[indices], indices, 25.0, 75), qwen3_cfg)
    assert np.array_equal(np.asarray(out["video_metadata"][0].frames_indices), indices)
    assert np.array_equal(np.asarray(out["video_grid_thw"])[0], grid)
    assert np.array_equal(np.asarray(out["pixel_values_videos"]), pixel_values)


# --- bad inputs ----------------------------------------------------------------------------------------


def _expect_error(path, kind: str, cfg: VideoConfig = QWEN2) -> VideoLoadError:
    with pytest.raises(VideoLoadError) as info:
        load_video(path, cfg)
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)
    if not isinstance(path, bytes):
        assert str(path) in str(info.value)
    return info.value


def test_bad_files(tmp_path, videos):
    _expect_error(tmp_path / "missing.mp4", "missing_file")
    _expect_error(tmp_path, "missing_file")  # a directory
    (tmp_path / "empty.mp4").write_bytes(b"")
    _expect_error(tmp_path / "empty.mp4", "empty_file")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "cannot open video" in str(_expect_error(tmp_path / "noise.mp4", "corrupt_media"))
    data = videos["faststart"].read_bytes()  # header (with the frame count) first, then cut mid-stream
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    assert "truncated" in str(_expect_error(tmp_path / "cut.mp4", "corrupt_media"))
    _expect_error(b"", "empty_file")


def test_too_short(videos):
    err = _expect_error(videos["short"], "video_too_short")
    assert "3 frame(s)" in str(err) and "video_min_frames=4" in str(err)
    _expect_error(videos["one"], "video_too_short", QWEN3)
    one_frame_ok = VideoConfig(min_frames=1)  # Qwen2: a single frame is padded to one temporal patch
    clip = load_video(videos["one"], one_frame_ok)
    assert preprocess_video(clip, one_frame_ok)[1][0] == 1
    qwen3_one = VideoConfig(processor="Qwen3VLVideoProcessor", patch_size=16, fps=2.0, min_frames=1)
    assert "Qwen3-VL needs at least 2" in str(_expect_error(videos["one"], "video_too_short", qwen3_one))


# --- configuration ---------------------------------------------------------------------------------------


def _model_dir(path: Path, model_type: str) -> Path:
    from vltune.core.families import get_family

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name, content in get_family(model_type).processor_configs().items():
        (path / name).write_text(json.dumps(content))
    return path


def test_config_from_tiny_model_dirs(tmp_path):
    qwen25 = VideoConfig.from_preprocessor_config(_model_dir(tmp_path / "q25", "qwen2_5_vl"))
    # Qwen2.5-VL ships no video config: transformers builds its video processor from the image one
    assert (qwen25.processor, qwen25.min_pixels, qwen25.max_pixels, qwen25.patch_size) == ("Qwen2VLVideoProcessor", 56 * 56, 28 * 28 * 1280, 14)
    assert (qwen25.base_interval, qwen25.min_frames, qwen25.max_frames) == (2.0, 4, 768)
    qwen3 = VideoConfig.from_preprocessor_config(_model_dir(tmp_path / "q3", "qwen3_vl"))
    assert (qwen3.processor, qwen3.min_pixels, qwen3.max_pixels, qwen3.patch_size) == ("Qwen3VLVideoProcessor", 4096, 25165824, 16)
    assert (qwen3.fps, qwen3.image_mean, qwen3.is_qwen3) == (2.0, (0.5, 0.5, 0.5), True)


def test_config_recipe_overrides_and_errors(tmp_path):
    d = _model_dir(tmp_path / "q25", "qwen2_5_vl")
    cfg = VideoConfig.from_preprocessor_config(
        d, None, video_min_pixels=1000, video_max_pixels=50000, video_min_frames=2, video_max_frames=8, base_interval=0.5,
        video_fps=None,
    )
    assert (cfg.min_pixels, cfg.max_pixels, cfg.min_frames, cfg.max_frames, cfg.base_interval) == (1000, 50000, 2, 8, 0.5)
    q3 = VideoConfig.from_preprocessor_config(_model_dir(tmp_path / "q3", "qwen3_vl"), "qwen3_vl", base_interval=0.25)
    assert q3.fps == 4.0
    with pytest.raises(ValueError, match="unknown video recipe key"):
        VideoConfig.from_preprocessor_config(d, max_pixels=5)
    with pytest.raises(ValueError, match="video_min_frames .* > video_max_frames"):
        VideoConfig.from_preprocessor_config(d, video_min_frames=9, video_max_frames=8)
    with pytest.raises(ValueError, match="do_resize=false"):
        VideoConfig.from_preprocessor_config({"do_resize": False})
    # processor_config.json's video_processor entry wins, as in transformers
    (d / "processor_config.json").write_text(json.dumps({"video_processor": {"min_pixels": 3, "max_pixels": 7, "fps": 4}}))
    cfg = VideoConfig.from_preprocessor_config(d)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.base_interval) == (3, 7, 0.25)
