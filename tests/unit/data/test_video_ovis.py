"""Ovis2.5 videos: vltune.data.video against transformers' ``Ovis2_5VideoProcessor`` and the Ovis recipe.

``Ovis2_5VideoProcessor`` imports torchvision, which this CPU machine lacks, so its pieces are checked
one by one here: its ``smart_resize`` and ``patchify`` compiled from the installed source file and run
as they are (``patchify`` on torch tensors), torchvision's resize written as the ATen call it makes on
a uint8 CPU tensor (``_do_native_uint8_resize_on_cpu``: the uint8 kernel where torch's capability is
"AVX2", float32 + round elsewhere), and the official Ovis training sampler restated line by line.
The processor itself runs once in a subprocess over a stand-in torchvision holding only the transcribed
CPU resize/normalize; the real torchvision comparison is ``tools/gpu/parity_ovis_video.py`` (GPU machine).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from vltune.data.video import (
    VideoClip,
    VideoConfig,
    load_video,
    preprocess_video,
    resize_bilinear_aa,
    resize_bilinear_aa_float,
    sample_frame_indices,
    segment_frame_indices,
    video_resize_target,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

OVIS = VideoConfig.ovis()
SMALL = replace(OVIS, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 24)


def _reference_function(name: str):
    """A top-level function or ``Ovis2_5VideoProcessor`` method from the installed
    ``video_processing_ovis2_5.py``, compiled without its torchvision import."""
    import transformers

    path = Path(transformers.__file__).parent / "models" / "ovis2_5" / "video_processing_ovis2_5.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Ovis2_5VideoProcessor")
    node = next(n for n in [*tree.body, *cls.body] if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    scope: dict = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


def _official_sampling_idx(_len, _min, _max):
    """AIDC-AI/Ovis ``ovis/train/dataset/multimodal_dataset.py``, ``read_video._sampling_idx``, verbatim logic."""
    if _len < _min or _len > _max:
        tgt_len = _min if _len < _min else _max
        stride = _len / tgt_len
        sampled_ids = []
        for i in range(tgt_len):
            start = int(np.round(stride * i))
            end = int(np.round(stride * (i + 1)))
            sampled_ids.append(min(_len - 1, (start + end) // 2))
        return sampled_ids
    return list(range(_len))


def _torchvision_resize(video: "torch.Tensor", size: tuple[int, int], native_uint8: bool) -> "torch.Tensor":
    """torchvision ``resize_image`` for a uint8 CPU tensor, bilinear, antialias=True: the uint8 kernel
    (capability "AVX2") or float32 -> interpolate -> round_ -> uint8 (any other capability)."""
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    if native_uint8:
        return F.interpolate(video, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(video.to(torch.float32), size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


def _reference_pixels(frames: np.ndarray, cfg: VideoConfig, native_uint8: bool) -> tuple[np.ndarray, list[int]]:
    """``Ovis2_5VideoProcessor._preprocess`` for one video in torch: its smart_resize, torchvision's resize,
    TorchvisionBackend's fused rescale+normalise, and its own ``patchify`` run as written."""
    smart_resize, patchify = _reference_function("smart_resize"), _reference_function("patchify")
    videos = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [B, T, C, H, W] uint8, as the processor holds it
    h, w = videos.shape[-2:]
    oh, ow = smart_resize(height=h, width=w, num_frames=videos.shape[1], factor=cfg.factor,
                          temporal_factor=cfg.temporal_patch_size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    b, t, c = videos.shape[:3]
    videos = _torchvision_resize(videos.reshape(b * t, c, h, w), (oh, ow), native_uint8).reshape(b, t, c, oh, ow)
    mean = torch.tensor(list(cfg.image_mean)) * (1.0 / cfg.rescale_factor)  # _fuse_mean_std_and_rescale_factor
    std = torch.tensor(list(cfg.image_std)) * (1.0 / cfg.rescale_factor)
    videos = videos.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))  # tvF.normalize
    patches, gt, gh, gw = patchify(None, videos, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return patches[0].numpy(), [gt, gh, gw]


@contextlib.contextmanager
def _captured_stdout():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def _clip(frames: np.ndarray) -> VideoClip:
    return VideoClip(frames, np.arange(len(frames)), 25.0, len(frames))


# --- sampling ----------------------------------------------------------------------------------------


def test_sampling_matches_official_ovis_recipe():
    for lo, hi in [(8, 8), (4, 16), (1, 32), (16, 64), (2, 3)]:
        for n in range(1, 160):
            expected = _official_sampling_idx(n, lo, hi)
            got = segment_frame_indices(n, lo, hi)
            assert got.dtype == np.int64 and got.tolist() == expected, (n, lo, hi)
            cfg = replace(OVIS, min_frames=lo, max_frames=hi)
            assert sample_frame_indices(n, 29.97, cfg).tolist() == expected
    assert segment_frame_indices(3, 8, 8).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]  # short clips repeat frames
    assert segment_frame_indices(100, 8, 8).tolist() == [6, 18, 31, 44, 56, 68, 81, 94]  # segment middles


# --- sizes and layout ----------------------------------------------------------------------------------


def test_resize_target_matches_reference_smart_resize():
    smart_resize = _reference_function("smart_resize")
    rng = np.random.default_rng(0)
    sizes = [(10, 50), (28, 28), (20, 4000), (40, 9000), (1080, 1920), (2160, 3840), (480, 640), (31, 33)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(200)]
    for lo, hi in [(448 * 448, 1344 * 1792), (448 * 448, 448 * 448), (32 * 32 * 4, 32 * 32 * 24)]:
        cfg = replace(OVIS, min_pixels=lo, max_pixels=hi)
        for h, w in sizes:
            for frames in (1, 8):  # the budget is per frame: the frame count must not matter
                expected = smart_resize(h, w, 32, lo, hi, num_frames=frames, temporal_factor=1)
                if min(expected) <= 0:
                    with pytest.raises(ValueError, match="too thin"):
                        video_resize_target(frames, h, w, cfg)
                    continue
                assert video_resize_target(frames, h, w, cfg) == expected, (h, w, lo, hi)


@pytest.mark.parametrize("native_uint8", [False, True], ids=["float_path", "uint8_path"])
def test_preprocess_matches_reference_pipeline(native_uint8):
    """Pixels and grid equal the processor's steps, for the torchvision path ``bilinear_path`` names."""
    cfg = replace(SMALL, bilinear_path="uint8" if native_uint8 else "float")
    shapes = [(8, 48, 64), (3, 240, 320), (1, 20, 100), (2, 700, 90), (5, 33, 47), (2, 64, 96), (2, 96, 128)]
    for seed, (t, h, w) in enumerate(shapes):
        frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        pixel_values, grid, _, _ = preprocess_video(_clip(frames), cfg)
        expected, expected_grid = _reference_pixels(frames, cfg, native_uint8)
        assert grid.dtype == np.int64 and grid.tolist() == expected_grid and expected_grid[0] == t
        assert pixel_values.dtype == np.float32 and pixel_values.shape == expected.shape
        if native_uint8 or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
            assert np.array_equal(pixel_values, expected), (t, h, w)
        else:  # torch's vectorised float kernels round a few two-pass values one level apart
            diff = np.abs(pixel_values - expected)
            assert (diff > 0).mean() < 2e-3 and diff.max() <= 1 / 255 / 0.5 + 1e-6, (t, h, w)


def test_patch_layout_matches_reference_patchify():
    patchify = _reference_function("patchify")
    rng = np.random.default_rng(3)
    for t, h, w in [(1, 64, 64), (3, 32, 96), (4, 128, 64)]:
        video = rng.standard_normal((t, h, w, 3)).astype(np.float32)
        cfg = replace(OVIS, min_pixels=h * w, max_pixels=h * w)
        from vltune.data.video import _patchify

        ours, grid = _patchify(video, cfg)
        ref, gt, gh, gw = patchify(None, torch.from_numpy(video).permute(0, 3, 1, 2)[None], 16, 2, 1)
        assert list(grid) == [gt, gh, gw] == [t, h // 16, w // 16]
        assert np.array_equal(ours, ref[0].numpy())


# --- the resize kernels --------------------------------------------------------------------------------

_KERNEL_CHECK = """
import numpy as np, torch
from vltune.data.frame_resize import resize_bilinear_aa, resize_bilinear_aa_float
torch.set_num_threads(1)
rng = np.random.default_rng(0)
bad_uint8 = bad_float = total = 0
for h, w, oh, ow in [(48, 64, 32, 32), (37, 91, 64, 96), (120, 160, 224, 288), (100, 100, 32, 320), (7, 9, 96, 128),
                     (300, 40, 288, 32), (360, 640, 96, 160), (33, 45, 64, 64)]:
    f = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    x = torch.from_numpy(f).permute(0, 3, 1, 2)
    for layout in (x, x.contiguous()):  # channels-last (as the processor holds frames) and contiguous
        ref = torch.nn.functional.interpolate(layout, (oh, ow), mode="bilinear", antialias=True, align_corners=False)
        bad_uint8 += int((resize_bilinear_aa(f, oh, ow) != ref.permute(0, 2, 3, 1).numpy()).sum())
        ref = torch.nn.functional.interpolate(layout.float(), (oh, ow), mode="bilinear", antialias=True).round_()
        bad_float += int((resize_bilinear_aa_float(f, oh, ow) != ref.to(torch.uint8).permute(0, 2, 3, 1).numpy()).sum())
        total += ref.numel()
print(torch.backends.cpu.get_cpu_capability(), bad_uint8, bad_float, total)
"""


@pytest.mark.parametrize("capability", ["native"])
def test_bilinear_resize_matches_torch_kernels(capability):
    """uint8 kernel: exact under every capability. float32 kernel: exact under DEFAULT (plain C++). The
    vectorised builds (AVX2, AVX512) contract multiply-adds into FMAs (and differ again on downscales
    by more than 2), so a few values in 10^4 round one level apart from ours; torchvision does not take
    the float path under AVX2 (it uses the uint8 kernel there), but AVX512 hosts do."""
    if capability == "native":
        namespace: dict = {}
        with _captured_stdout() as buffer:
            exec(_KERNEL_CHECK, namespace)
        cap, bad_uint8, bad_float, total = buffer.getvalue().split()
    else:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        cap, bad_uint8, bad_float, total = out.stdout.split()
    if capability != "native" and cap != capability.upper():
        pytest.skip(f"this CPU cannot run torch's {capability} kernels (got {cap})")
    assert int(bad_uint8) == 0
    assert int(bad_float) == 0 if cap == "DEFAULT" else int(bad_float) < 1e-3 * int(total), (bad_float, total)


def test_uint8_and_float_paths_differ_so_the_choice_matters():
    frames = np.random.default_rng(1).integers(0, 256, (1, 90, 160, 3), dtype=np.uint8)
    a, b = resize_bilinear_aa(frames, 224, 384).astype(int), resize_bilinear_aa_float(frames, 224, 384).astype(int)
    assert np.abs(a - b).max() == 1 and (a != b).mean() > 0.01


# --- configuration and loading -------------------------------------------------------------------------


def test_config_from_ovis_files_and_recipe():
    for raw in ({"video_processor_type": "Ovis2_5VideoProcessor"}, {"processor_class": "Ovis2_5Processor"},
                {"image_processor_type": "Ovis2_5ImageProcessor"}):
        assert VideoConfig.from_preprocessor_config(raw) == OVIS
    assert (OVIS.patch_size, OVIS.temporal_patch_size, OVIS.merge_size, OVIS.resample) == (16, 1, 2, 2)
    assert (OVIS.min_pixels, OVIS.max_pixels, OVIS.min_frames, OVIS.max_frames) == (448 * 448, 1344 * 1792, 8, 8)
    cfg = VideoConfig.from_preprocessor_config(
        {"video_processor_type": "Ovis2_5VideoProcessor", "size": {"shortest_edge": 1000, "longest_edge": 90000},
         "min_pixels": 1, "max_pixels": 2},  # not Ovis2.5 processor keys
        video_min_pixels=2048, video_min_frames=4, video_max_frames=32,
    )
    assert (cfg.min_pixels, cfg.max_pixels, cfg.min_frames, cfg.max_frames) == (2048, 90000, 4, 32)
    assert VideoConfig.from_preprocessor_config({}).processor == "Qwen2VLVideoProcessor"  # Qwen untouched


def test_config_from_model_type_when_family_is_registered():
    from vltune.core.families import get_family

    try:
        family = get_family("ovis2_5")
    except (KeyError, ValueError):
        pytest.skip("the ovis2_5 family is not registered yet")
    assert family.media.video_processor == "Ovis2_5VideoProcessor"
    assert VideoConfig.from_preprocessor_config({}, model_type="ovis2_5") == OVIS


@pytest.mark.parametrize("resample", [0, 1, 4, 5])
def test_unsupported_resample_is_refused(resample):
    with pytest.raises(ValueError, match=rf"resample={resample}.*2 \(bilinear"):
        VideoConfig.from_preprocessor_config({"video_processor_type": "Ovis2_5VideoProcessor", "resample": resample})
    with pytest.raises(ValueError, match=f"resample={resample} is not reproduced"):
        VideoConfig.ovis(resample=resample)


def test_load_video_short_clip_repeats_frames(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "short.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            img = np.full((48, 64, 3), 40 * i + 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = load_video(path, SMALL)  # 3 frames < min_frames 8: Ovis repeats instead of refusing
    assert clip.frame_indices.tolist() == [0, 0, 1, 1, 2, 2, 2, 2] and len(clip.frames) == 8
    pixel_values, grid, _, _ = preprocess_video(clip, SMALL)
    assert grid.tolist()[0] == 8 and pixel_values.shape[0] == int(np.prod(grid))


# --- the real processor, with torchvision's CPU resize transcribed --------------------------------------

# torchvision is not installable here; this stand-in holds only what Ovis2_5VideoProcessor's CPU path
# calls, transcribed from torchvision/transforms/v2/functional/_geometry.py (resize_image,
# _do_native_uint8_resize_on_cpu), _misc.py (normalize) and _color.py (grayscale_to_rgb).
_TORCHVISION_STAND_IN = {
    "torchvision-0.28.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n",
    "torchvision/__init__.py": "__version__ = '0.28.0'\nfrom . import io, transforms\n",
    "torchvision/io.py": "",
    "torchvision/transforms/__init__.py": (
        "import enum\n"
        "class InterpolationMode(enum.Enum):\n"
        "    NEAREST = 'nearest'; NEAREST_EXACT = 'nearest-exact'; BILINEAR = 'bilinear'; BICUBIC = 'bicubic'\n"
        "    BOX = 'box'; HAMMING = 'hamming'; LANCZOS = 'lanczos'\n"
        "from . import functional, v2\n"
    ),
    "torchvision/transforms/functional.py": "def pil_to_tensor(pic):\n    raise NotImplementedError\n",
    "torchvision/transforms/v2/__init__.py": "from . import functional\n",
    "torchvision/transforms/v2/functional.py": """
import torch
from torch.nn.functional import interpolate
from .. import InterpolationMode

def _native_uint8(interpolation):
    if interpolation == InterpolationMode.BILINEAR:
        return "AVX2" in torch.backends.cpu.get_cpu_capability()
    return interpolation == InterpolationMode.BICUBIC

def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    shape = image.shape
    c, h, w = shape[-3:]
    nh, nw = size
    if (nh, nw) == (h, w):
        return image
    dtype = image.dtype
    ok = [torch.float32, torch.float64]
    if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        ok.append(torch.uint8)
    elif image.device.type == "cpu" and _native_uint8(interpolation):
        ok.append(torch.uint8)
    image = image.reshape(-1, c, h, w)
    need_cast = dtype not in ok
    if need_cast:
        image = image.to(dtype=torch.float32)
    image = interpolate(image, size=[nh, nw], mode=interpolation.value, align_corners=False, antialias=antialias)
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(min=0, max=255)
        image = image.round_()
        image = image.to(dtype=dtype)
    return image.reshape(shape[:-3] + (c, nh, nw))

def normalize(tensor, mean, std, inplace=False):
    if not inplace:
        tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)

def grayscale_to_rgb(image):
    if image.shape[-3] >= 3:
        return image
    return image.expand(image.shape[:-3] + (3,) + image.shape[-2:])
""",
}

_END_TO_END = """
import json, numpy as np, torch, transformers
from dataclasses import replace
from vltune.data.video import VideoClip, VideoConfig, preprocess_video
path = "uint8" if "AVX2" in torch.backends.cpu.get_cpu_capability() else "float"
results = []
for size in ({"shortest_edge": 4096, "longest_edge": 24576}, {"shortest_edge": 1024, "longest_edge": 8192}):
    proc = transformers.Ovis2_5VideoProcessor(size=size)
    cfg = replace(VideoConfig.from_preprocessor_config(proc.to_dict()), bilinear_path=path)
    for seed, (t, h, w) in enumerate([(8, 48, 64), (2, 120, 200), (1, 20, 100), (2, 100, 40)]):
        frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        out = proc(videos=[frames], return_tensors="np")
        pv, grid, _, _ = preprocess_video(VideoClip(frames, np.arange(t), 25.0, t), cfg)
        results.append([bool(np.array_equal(pv, out["pixel_values_videos"])), grid.tolist(), out["video_grid_thw"][0].tolist()])
print(json.dumps([cfg.is_ovis, path, results]))
"""


def test_real_processor_with_torchvision_resize_transcribed(tmp_path):
    """``Ovis2_5VideoProcessor`` itself (grouping, resize call, fused normalise, patchify) against
    ``preprocess_video``, bit for bit, under torch's DEFAULT kernels, where torchvision takes the float
    path (the uint8 path, taken under AVX2, is checked kernel by kernel above and on the GPU machine)."""
    for rel, text in _TORCHVISION_STAND_IN.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    package_root = Path(__file__).resolve().parents[3]  # the vltune checkout, importable as `vltune`
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "vltune").symlink_to(package_root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tmp_path / "pkg")]), "OMP_NUM_THREADS": "1",
           "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", _END_TO_END], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    is_ovis, path, results = json.loads(out.stdout.strip().splitlines()[-1])
    assert is_ovis and path == "float" and len(results) == 8
    for exact, grid, expected_grid in results:
        assert grid == expected_grid and exact, (path, grid)
