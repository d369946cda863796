"""Ovis2.5 images: vltune.data.vision against transformers' ``Ovis2_5ImageProcessorPil``.

Equality is exact (``np.array_equal``, same dtype and shape): both sides run the same PIL
resize of the same uint8 image and the same float64 -> float32 arithmetic, so any difference
is a bug. Big images are checked through their size alone (``resize_target`` / ``grid_thw``
against the reference's ``smart_resize`` and ``get_number_of_image_patches``); a few go through
full pixels at the real default budget, the rest under a smaller one to stay fast.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vltune.data.vision import VisionConfig, image_size, load_image, preprocess_image, smart_resize_ovis

transformers = pytest.importorskip("transformers")
from transformers.models.ovis2_5 import image_processing_pil_ovis2_5 as ref_image  # noqa: E402

OVIS = VisionConfig.ovis()
SMALL = replace(OVIS, min_pixels=64 * 64, max_pixels=160 * 160)  # binds both limits on small images


def _reference(cfg: VisionConfig):
    """The processor with the same size dict (and filter) as ``cfg``."""
    return transformers.Ovis2_5ImageProcessorPil(
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}, resample=cfg.resample
    )


def _video_smart_resize():
    """``smart_resize`` of ``video_processing_ovis2_5.py``, compiled from its source: the module
    itself imports torchvision, which this machine lacks."""
    path = Path(ref_image.__file__).with_name("video_processing_ovis2_5.py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    scope: dict = {"math": math}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope["smart_resize"]


def _image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Noise plus a ramp in ``mode`` (noise stresses the filter, the ramp gives smooth areas)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65536, size=(height, width), dtype=np.uint16)
        return Image.fromarray(arr)  # uint16 -> mode "I;16"
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8), mode="P")
        img.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tobytes())
        return img
    bands = len(Image.new(mode, (1, 1)).getbands())
    noise = rng.integers(0, 256, size=(height, width, bands), dtype=np.int64)
    ramp = np.linspace(0, 255, width)[None, :, None]
    arr = ((noise + ramp) / 2).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode=mode)


def _assert_matches(image: Image.Image, cfg: VisionConfig, proc=None) -> np.ndarray:
    out = (proc or _reference(cfg))(images=image)
    expected_pv, expected_grid = np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])[0]
    pixel_values, grid = preprocess_image(image, cfg)
    assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
    assert np.array_equal(grid, expected_grid), (image.size, grid, expected_grid)
    assert np.array_equal(grid, cfg.grid_thw(image.height, image.width))  # the header-only path agrees
    assert pixel_values.shape == expected_pv.shape
    assert np.array_equal(pixel_values, expected_pv), float(np.abs(pixel_values - expected_pv).max())
    return grid


# --- sizes: the resize rule ---------------------------------------------------------------------

# (height, width): below the factor (10x50, 28x28), exactly the factor, ordinary, ratio exactly 200,
# above 200 with a side below the factor (no clamp) and with both sides above it (clamped), huge.
SIZE_CORPUS = [
    (28, 28), (10, 50), (50, 10), (1, 1), (31, 33), (32, 32), (33, 31), (97, 61), (224, 224), (300, 517),
    (640, 123), (448, 448), (1080, 1920), (1344, 1792), (1792, 1344), (2000, 2000), (2400, 3200), (3000, 4000),
    (4000, 4000), (4000, 3999), (20, 4000), (4000, 20), (32, 6400), (20, 4100), (40, 9000), (9000, 40),
    (33, 6601), (100, 20001), (20001, 100), (4000, 7), (7, 4000), (5, 5), (255, 257), (511, 1023),
]
BUDGETS = [(448 * 448, 1344 * 1792), (64 * 64, 160 * 160), (32 * 32, 32 * 32 * 4), (1, 10**9)]


@pytest.mark.parametrize("min_pixels,max_pixels", BUDGETS)
def test_resize_target_matches_both_reference_functions(min_pixels, max_pixels):
    video_rule = _video_smart_resize()
    rng = np.random.default_rng(0)
    fuzz = [tuple(int(v) for v in rng.integers(1, 5000, size=2)) for _ in range(300)]
    cfg = replace(OVIS, min_pixels=min_pixels, max_pixels=max_pixels)
    checked = thin = 0
    for h, w in SIZE_CORPUS + fuzz:
        try:
            expected = ref_image.smart_resize(h, w, 32, min_pixels, max_pixels)
        except ZeroDivisionError:
            continue
        assert expected == video_rule(h, w, 32, min_pixels, max_pixels)
        if min(expected) <= 0:  # transformers would fail later, inside PIL; we say why up front
            with pytest.raises(ValueError, match="too thin"):
                cfg.resize_target(h, w)
            thin += 1
            continue
        assert cfg.resize_target(h, w) == expected, (h, w)
        assert smart_resize_ovis(h, w, 32, min_pixels, max_pixels) == expected
        checked += 1
    assert checked + thin > 300 and checked > 100


def test_grid_matches_reference_patch_count():
    proc = _reference(OVIS)
    for h, w in SIZE_CORPUS:
        grid = OVIS.grid_thw(h, w)
        assert grid[0] == 1 and int(np.prod(grid)) == proc.get_number_of_image_patches(h, w), (h, w)
        assert grid[1] % 2 == 0 and grid[2] % 2 == 0  # merge windows are whole


def test_rule_differs_from_qwen_where_it_should():
    qwen = replace(VisionConfig(patch_size=16, min_pixels=OVIS.min_pixels, max_pixels=OVIS.max_pixels))
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen.resize_target(40, 9000)
    assert OVIS.resize_target(40, 9000) == ref_image.smart_resize(40, 9000)
    assert OVIS.grid_thw(20, 4000).tolist() == [1, 2, 400]  # a side below 32 is scaled up first


# --- pixels ------------------------------------------------------------------------------------

# Full pixels at Ovis2.5's real budget (every image becomes >= 448*448 pixels).
DEFAULT_BUDGET_IMAGES = [((28, 28), "RGB"), ((10, 50), "RGB"), ((300, 517), "RGB"), ((2400, 3200), "RGB"),
                         ((20, 4000), "RGB"), ((40, 9000), "RGB")]
# Full pixels under SMALL: every mode our loader hands on, odd sizes, both limits binding.
SMALL_BUDGET_IMAGES = [
    ((97, 61), "RGB"), ((640, 123), "RGB"), ((12, 20), "RGB"), ((50, 10), "RGB"), ((33, 700), "RGB"),
    ((300, 20), "RGB"), ((1000, 1000), "RGB"), ((160, 160), "RGB"), ((64, 64), "RGB"),
    ((77, 131), "RGBA"), ((130, 90), "LA"), ((90, 130), "P"), ((121, 83), "L"), ((101, 99), "I;16"),
    ((45, 300), "CMYK"), ((300, 45), "RGBA"),
]


@pytest.mark.parametrize("size,mode", DEFAULT_BUDGET_IMAGES)
def test_pixels_match_reference_default_budget(size, mode):
    _assert_matches(_image(*size, seed=size[0] * 7 + size[1], mode=mode), OVIS)


def test_pixels_match_reference_small_budget_all_modes():
    proc = _reference(SMALL)
    for i, (size, mode) in enumerate(SMALL_BUDGET_IMAGES):
        _assert_matches(_image(*size, seed=i, mode=mode), SMALL, proc)
    transparent = _image(60, 70, seed=99, mode="P")
    transparent.info["transparency"] = 3  # palette transparency composites onto white, as in transformers
    _assert_matches(transparent, SMALL, proc)


def test_too_thin_for_the_budget_is_refused_by_both():
    """Ovis2.5's max_pixels branch has no floor, so a thin image under a small budget gets a side
    of 0: transformers fails deep in its resize, we fail up front and say why."""
    proc = _reference(SMALL)
    for size in [(33, 7000), (4000, 20)]:
        image = _image(*size, seed=1)
        with pytest.raises(ValueError):
            proc(images=image)
        with pytest.raises(ValueError, match="too thin for the pixel budget"):
            preprocess_image(image, SMALL)


def test_pixels_match_reference_bicubic_when_the_file_asks():
    cfg = replace(SMALL, resample=3)
    _assert_matches(_image(150, 97, seed=5), cfg)


def test_tiny_pixel_overrides_match_reference_with_same_size_dict(tmp_path):
    """The recipe's min_pixels / max_pixels land on size.shortest_edge / longest_edge."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Ovis2_5ImageProcessor", "size": {"shortest_edge": 200704, "longest_edge": 2408448}}))
    base = VisionConfig.from_preprocessor_config(tmp_path)
    assert base == OVIS
    for low, high in [(32 * 32, 32 * 32 * 4), (32 * 32 * 4, 32 * 32 * 4), (100, 64 * 64)]:
        cfg = replace(base, min_pixels=low, max_pixels=high)  # what SFTDataset does with the recipe keys
        proc = _reference(cfg)
        for i, size in enumerate([(500, 300), (31, 45), (64, 64), (300, 200)]):
            _assert_matches(_image(*size, seed=i), cfg, proc)


def test_exif_rotated_jpegs_match_transformers_loader(tmp_path):
    """Our loader applies the EXIF orientation; so does transformers' ``load_image`` for a path,
    so both pipelines see the same upright image (the processor itself ignores EXIF)."""
    from transformers.image_utils import load_image as hf_load_image

    proc = _reference(SMALL)
    for orientation in (3, 6, 8):
        path = tmp_path / f"o{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        _image(90, 170, seed=orientation).save(path, quality=90, exif=exif)
        ours, theirs = load_image(path), hf_load_image(str(path))
        assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))
        grid = _assert_matches(ours, SMALL, proc)
        expected = proc(images=theirs)
        assert np.array_equal(preprocess_image(ours, SMALL)[0], np.asarray(expected["pixel_values"]))
        assert np.array_equal(SMALL.grid_thw(*image_size(path)), grid)  # header path sees the rotation
        assert image_size(path) == ((170, 90) if orientation in (6, 8) else (90, 170))


def test_sixteen_bit_png_through_our_loader(tmp_path):
    path = tmp_path / "deep.png"
    _image(80, 120, seed=3, mode="I;16").save(path)
    loaded = load_image(path)
    with Image.open(path) as raw:
        raw.load()
        _assert_matches(raw, SMALL)  # the processor given the decoded 16-bit image ...
        assert np.array_equal(preprocess_image(loaded, SMALL)[0], preprocess_image(raw, SMALL)[0])  # ... = ours


# --- configuration ---------------------------------------------------------------------------------


def test_config_detects_ovis_from_the_file():
    for raw in ({"image_processor_type": "Ovis2_5ImageProcessor"}, {"image_processor_type": "Ovis2_5ImageProcessorPil"},
                {"processor_class": "Ovis2_5Processor"}):
        assert VisionConfig.from_preprocessor_config(raw) == OVIS
    cfg = VisionConfig.from_preprocessor_config(
        {"image_processor_type": "Ovis2_5ImageProcessor", "resample": 3, "size": {"shortest_edge": 100, "longest_edge": 9000},
         "min_pixels": 5, "max_pixels": 6})  # top-level keys are not Ovis2.5 processor keys
    assert (cfg.resample, cfg.min_pixels, cfg.max_pixels, cfg.resize_rule) == (3, 100, 9000, "Ovis2_5ImageProcessor")
    proc = transformers.Ovis2_5ImageProcessorPil()
    assert (OVIS.patch_size, OVIS.temporal_patch_size, OVIS.merge_size) == (proc.patch_size, proc.temporal_patch_size, proc.merge_size)
    assert (OVIS.min_pixels, OVIS.max_pixels) == (proc.size["shortest_edge"], proc.size["longest_edge"])
    assert OVIS.image_mean == tuple(proc.image_mean) and OVIS.image_std == tuple(proc.image_std) and OVIS.resample == proc.resample


def test_config_from_transformers_saved_processor(tmp_path):
    transformers.Ovis2_5ImageProcessorPil(size={"shortest_edge": 1024, "longest_edge": 4096}).save_pretrained(tmp_path)
    cfg = VisionConfig.from_preprocessor_config(tmp_path)
    assert cfg == replace(OVIS, min_pixels=1024, max_pixels=4096)


def test_qwen_files_keep_qwen_rule():
    assert VisionConfig.from_preprocessor_config({}) == VisionConfig()
    assert VisionConfig.from_preprocessor_config({"image_processor_type": "Qwen2VLImageProcessor"}).resize_rule == "Qwen2VLImageProcessor"


@pytest.mark.parametrize("resample", [0, 1, 4, 5])
def test_unsupported_resample_is_refused(resample):
    with pytest.raises(ValueError, match=rf"resample={resample}.*2 \(bilinear"):
        VisionConfig.from_preprocessor_config({"image_processor_type": "Ovis2_5ImageProcessor", "resample": resample})
    with pytest.raises(ValueError, match=f"resample={resample} is not reproduced"):
        VisionConfig.ovis(resample=resample)
    with pytest.raises(ValueError, match="bicubic"):
        VisionConfig.from_preprocessor_config({"resample": 2})  # Qwen still takes bicubic only
