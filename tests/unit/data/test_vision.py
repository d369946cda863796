"""Tests for vltune.data.vision.

The comparisons against transformers' ``Qwen2VLImageProcessorPil`` require
bit-exact equality (``np.array_equal``, same dtype and shape), not a tolerance:
our pipeline performs the same uint8 PIL resize and the same float64/float32
arithmetic, so any difference at all is a bug.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from vltune.data.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLoadError,
    VisionConfig,
    load_image,
    preprocess_image,
    smart_resize,
    to_rgb,
)

# Small pixel budgets keep the comparisons fast; the limits still bind.
QWEN2 = VisionConfig(min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28)
QWEN3 = VisionConfig(
    patch_size=16, min_pixels=4 * 32 * 32, max_pixels=256 * 32 * 32, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
)

# (height, width): square, landscape, portrait, extreme ratio, odd sizes,
# far above max_pixels, below min_pixels.
SIZES = [(224, 224), (300, 517), (640, 123), (40, 1500), (97, 61), (2400, 3200), (12, 20)]


def _random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Noise plus a gradient: noise stresses bicubic overshoot/clamping, the
    gradient gives realistic smooth regions."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    noise = rng.integers(0, 256, size=(height, width, bands), dtype=np.int64)
    ramp = np.linspace(0, 255, width)[None, :, None]
    arr = ((noise + ramp) / 2).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode=mode)


def _hf_processor(cfg: VisionConfig):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )


def _assert_matches_hf(image: Image.Image, cfg: VisionConfig, proc) -> None:
    out = proc(images=image)
    expected_pv = np.asarray(out["pixel_values"])
    expected_grid = np.asarray(out["image_grid_thw"])[0]
    pixel_values, grid_thw = preprocess_image(image, cfg)
    assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
    assert np.array_equal(grid_thw, expected_grid)
    assert pixel_values.shape == expected_pv.shape
    assert np.array_equal(pixel_values, expected_pv)  # exact, bit for bit


# --- smart_resize ---------------------------------------------------------------------


def test_smart_resize_documented_example():
    h, w = smart_resize(1080, 1920, factor=28, min_pixels=16 * 28 * 28, max_pixels=576 * 28 * 28)
    assert (h, w) == (504, 896)
    grid = (1, h // 14, w // 14)
    assert grid == (1, 36, 64)
    assert grid[1] * grid[2] // 4 == 576  # merged LLM tokens


def test_smart_resize_bounds_and_aspect_limit():
    assert smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280) == (56, 56)
    h, w = smart_resize(5000, 5000, 32, 64 * 32 * 32, 100 * 32 * 32)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 100 * 32 * 32
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_smart_resize_matches_transformers_fuzz():
    qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 5000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        for factor, lo, hi in ((28, 56 * 56, 28 * 28 * 1280), (32, 65536, 16777216), (28, 3136, 200704)):
            assert smart_resize(h, w, factor, lo, hi) == qwen.smart_resize(h, w, factor, lo, hi)


# --- exact match with transformers ------------------------------------------------------


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2_vl", "qwen3_vl"])
def test_matches_transformers_random_sizes(cfg: VisionConfig):
    proc = _hf_processor(cfg)
    for seed, (h, w) in enumerate(SIZES):
        _assert_matches_hf(_random_image(h, w, seed), cfg, proc)


def test_sizes_exercise_both_pixel_limits():
    big_h, big_w = SIZES[-2]
    small_h, small_w = SIZES[-1]
    assert big_h * big_w > 10 * QWEN2.max_pixels
    assert small_h * small_w < QWEN2.min_pixels


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P"])
def test_matches_transformers_other_modes(mode: str):
    """transformers converts non-RGB input itself; we must agree on that too.

    Before 5.23 transformers' convert_to_rgb dropped alpha (plain convert("RGB")); 5.23 composites
    onto white, as qwen-vl-utils always did. vltune follows the latter and pins transformers>=5.23.
    """
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    if mode in ("RGBA", "LA", "P") and Version(transformers.__version__) < Version("5.23"):
        pytest.skip(f"transformers {transformers.__version__} drops alpha instead of compositing on white")
    proc = _hf_processor(QWEN2)
    if mode == "P":
        image = _random_image(90, 130, 7).quantize(16)
        image.info["transparency"] = 3
    else:
        image = _random_image(90, 130, 7, mode=mode)
    _assert_matches_hf(image, QWEN2, proc)


def test_matches_transformers_real_qwen3_defaults():
    cfg = VisionConfig.from_preprocessor_config(
        {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    )
    _assert_matches_hf(_random_image(150, 260, 11), cfg, _hf_processor(cfg))


def test_patch_layout_is_merge_window_order():
    """Hand-check one entry so the layout is pinned even without transformers."""
    cfg = VisionConfig(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=64,
                       image_mean=(0.0,) * 3, image_std=(1.0,) * 3, rescale_factor=1.0)
    arr = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    pv, grid = preprocess_image(Image.fromarray(arr), cfg)
    assert grid.tolist() == [1, 4, 4] and pv.shape == (16, 3 * 2 * 2 * 2)
    # Row 2 = merge window (0,0), inner position (1,0) -> patch at pixel rows 2-3, cols 0-1.
    row = pv[2].reshape(3, 2, 2, 2)  # (C, T, P, P)
    assert np.array_equal(row[1, 0], arr[2:4, 0:2, 1])
    assert np.array_equal(row[:, 0], row[:, 1])  # temporal repeat
    # Row 4 = second merge window along the width -> pixel cols 4-5.
    assert np.array_equal(pv[4].reshape(3, 2, 2, 2)[0, 0], arr[0:2, 4:6, 0])


# --- VisionConfig -----------------------------------------------------------------------


def test_config_from_qwen2_file_and_dir(tmp_path):
    raw = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
           "image_processor_type": "Qwen2VLImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    expected = VisionConfig(min_pixels=3136, max_pixels=12845056)
    assert VisionConfig.from_preprocessor_config(tmp_path / "preprocessor_config.json") == expected
    assert VisionConfig.from_preprocessor_config(str(tmp_path)) == expected
    assert expected.factor == 28


def test_config_top_level_pixels_win_over_size_like_transformers():
    raw = {"min_pixels": 1000, "max_pixels": 50000, "size": {"shortest_edge": 1, "longest_edge": 2}}
    cfg = VisionConfig.from_preprocessor_config(raw)
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 50000)
    transformers = pytest.importorskip("transformers")
    proc = transformers.Qwen2VLImageProcessorPil.from_dict(raw)
    assert (proc.size.shortest_edge, proc.size.longest_edge) == (1000, 50000)


def test_config_qwen3_size_dict_and_rejections():
    cfg = VisionConfig.from_preprocessor_config(
        {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    )
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor, cfg.image_mean) == (65536, 16777216, 32, (0.5,) * 3)
    assert VisionConfig.from_preprocessor_config({}) == VisionConfig()
    with pytest.raises(ValueError, match="resampl"):
        VisionConfig.from_preprocessor_config({"resample": 2})
    with pytest.raises(ValueError, match="do_normalize"):
        VisionConfig.from_preprocessor_config({"do_normalize": False})


# --- load_image -------------------------------------------------------------------------


def test_load_image_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.png"
    img.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    assert np.array_equal(np.asarray(loaded), np.asarray(img.transpose(Image.Transpose.ROTATE_270)))
    assert loaded.getpixel((0, 0)) == (255, 0, 0) and loaded.getpixel((0, 39)) == (0, 0, 0)


def test_load_image_rgba_composited_on_white(tmp_path):
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    arr[0, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    arr[0, 2] = (0, 0, 0, 128)  # half transparent black -> mid grey
    path = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(path)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())


def test_load_image_grayscale_cmyk_palette(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png"))[0, 0].tolist() == [77, 77, 77]
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert load_image(tmp_path / "c.tif").getpixel((1, 1)) == (255, 0, 0)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 transparent
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_errors(tmp_path):
    cases = {"missing.png": None, "empty.png": b"", "corrupt.png": b"\x89PNG not really an image" * 10}
    good = io.BytesIO()
    _random_image(64, 64, 0).save(good, "PNG")
    cases["truncated.png"] = good.getvalue()[: len(good.getvalue()) // 2]
    reasons = {}
    for name, payload in cases.items():
        path = tmp_path / name
        if payload is not None:
            path.write_bytes(payload)
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert isinstance(info.value, ValueError)
        assert info.value.path == str(path) and str(path) in str(info.value)
        reasons[name] = info.value.reason
    assert "not found" in reasons["missing.png"]
    assert "empty" in reasons["empty.png"]
    assert "decode" in reasons["corrupt.png"] and "decode" in reasons["truncated.png"]


def test_token_count_consistent_with_grid():
    pv, grid = preprocess_image(_random_image(1080 // 4, 1920 // 4, 3), QWEN2)
    assert pv.shape == (int(np.prod(grid)), 3 * 2 * 14 * 14)
    assert math.prod(grid.tolist()) % QWEN2.merge_size**2 == 0
