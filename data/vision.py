"""Image preprocessing for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Ovis2.5, in numpy and PIL.

The vision tower was trained on pixels produced by transformers' image processor,
so anything we feed it must match that processor exactly: a different resize
filter, rounding step or patch order silently degrades a fine-tune. This module
reproduces ``transformers.Qwen2VLImageProcessorPil`` (the PIL backend, which
Qwen3-VL also uses, with patch 16 and mean/std 0.5) without importing
transformers or torch; ``tests/unit/data/test_vision.py`` checks the outputs are
bit-identical (``np.array_equal``) to it.

Pipeline, as in transformers: convert to RGB (alpha composited onto white) ->
``smart_resize`` to a multiple of ``patch_size * merge_size`` -> PIL bicubic
resize of the uint8 image -> rescale in float64, cast to float32 -> normalize in
float32 -> repeat ``temporal_patch_size`` times -> flatten patches in
merge-window order.

Ovis2.5 (``transformers.Ovis2_5ImageProcessorPil``, checked bit for bit by
``tests/unit/data/test_vision_ovis.py``) runs the very same pipeline with other
settings and another resize rule (``VisionConfig.resize_rule == "Ovis2_5ImageProcessor"``):
``smart_resize_ovis`` (sides below the factor are scaled up first, aspect ratios
above 200 are clamped instead of refused, no ``max(factor, ...)`` floor), PIL
*bilinear* (resample 2), mean/std 0.5, patch 16, ``temporal_patch_size`` 1 and
``size = {shortest_edge: 448*448, longest_edge: 1344*1792}`` as pixel bounds.
Callers never pick the rule themselves: ``VisionConfig.resize_target`` and
``VisionConfig.grid_thw`` answer for the config's model family.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import json
import math
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR: Ovis2.5's filter
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC; the only filter the Qwen processors use
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

RESIZE_RULES = ("Qwen2VLImageProcessor", "Ovis2_5ImageProcessor")
"""Whose smart_resize a VisionConfig follows: Qwen2/2.5/3-VL's or Ovis2.5's."""
_RESAMPLES = {"Qwen2VLImageProcessor": (_BICUBIC,), "Ovis2_5ImageProcessor": (_BILINEAR, _BICUBIC)}
"""PIL filters we reproduce per rule (the resize is PIL's own call, so exact for each; only these are tested)."""
_OVIS_IMAGE_PROCESSORS = ("Ovis2_5ImageProcessor", "Ovis2_5ImageProcessorPil")

PathLike = Union[str, "os.PathLike[str]"]


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Target (height, width): both multiples of ``factor``, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible.

    A line-for-line copy of transformers' Qwen2-VL ``smart_resize`` (including
    Python's banker's ``round``), because the token count of every sample
    depends on it and must agree with the processor used at inference time.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_ovis(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = 448 * 448,
    max_pixels: int = 1344 * 1792,
) -> tuple[int, int]:
    """Ovis2.5's target (height, width): a line-for-line copy of transformers'
    transformers' Ovis2.5 ``smart_resize`` (the image and the video module carry the same one;
    the pixel budget is per frame).

    Unlike Qwen's: a side below ``factor`` is first set to ``factor`` with the other side
    scaled to keep the ratio (``round``, banker's), an aspect ratio above 200 is clamped to
    200 rather than refused (the image is then squashed, not cropped), and the ``max_pixels``
    branch has no ``max(factor, ...)`` floor. That last point lets a side reach 0 for very
    thin images under a small ``max_pixels``; transformers then fails inside PIL, we raise a
    ValueError that says why.
    """
    if height < factor or width < factor:
        if height < width:
            width = round(factor / height * width)
            height = factor
        else:
            height = round(factor / width * height)
            width = factor
    elif max(height, width) / min(height, width) > 200:
        if height > width:
            height = 200 * width
        else:
            width = 200 * height

    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise ValueError(
            f"Ovis2.5 resize of a {height}x{width} image under max_pixels={max_pixels} gives {h_bar}x{w_bar}: "
            f"the image is too thin for the pixel budget; raise max_pixels or crop the image"
        )
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionConfig:
    """Preprocessing settings; the defaults are Qwen2-VL / Qwen2.5-VL's
    (and those of transformers' ``Qwen2VLImageProcessorPil`` class). ``VisionConfig.ovis()``
    gives ``Ovis2_5ImageProcessorPil``'s."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resize_rule: str = "Qwen2VLImageProcessor"
    """Whose smart_resize picks the target size: "Qwen2VLImageProcessor" (Qwen2/2.5/3-VL) or "Ovis2_5ImageProcessor"."""
    resample: int = _BICUBIC
    """PIL filter of the resize (3 bicubic for Qwen; Ovis2.5 uses 2, bilinear)."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VisionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(f"VisionConfig.resize_rule must be one of {RESIZE_RULES}, got {self.resize_rule!r}")
        if self.resample not in _RESAMPLES[self.resize_rule]:
            raise ValueError(
                f"resample={self.resample} is not reproduced for {self.resize_rule} images; supported: "
                f"{_RESAMPLES[self.resize_rule]} (2 = bilinear, 3 = bicubic)"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 (RGB) entries")

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this so patches merge evenly."""
        return self.patch_size * self.merge_size

    @classmethod
    def ovis(cls, **changes: Any) -> "VisionConfig":
        """``Ovis2_5ImageProcessorPil``'s class defaults, with ``changes`` applied."""
        defaults: dict[str, Any] = dict(
            patch_size=16, temporal_patch_size=1, merge_size=2, min_pixels=448 * 448, max_pixels=1344 * 1792,
            image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, resize_rule="Ovis2_5ImageProcessor",
            resample=_BILINEAR,
        )
        return cls(**{**defaults, **changes})

    def resize_target(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to, by this config's family rule.

        The one place that picks the rule: token counts from headers, the pixels themselves and
        any estimate must all agree, or a sample's placeholders and features disagree.
        """
        if self.resize_rule == "Ovis2_5ImageProcessor":
            return smart_resize_ovis(height, width, self.factor, self.min_pixels, self.max_pixels)
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> np.ndarray:
        """int64 ``[1, grid_h, grid_w]`` of an image of this (height, width), from its size alone;
        the LLM sees ``grid_h * grid_w // merge_size**2`` tokens for it."""
        h, w = self.resize_target(height, width)
        return np.array([1, h // self.patch_size, w // self.patch_size], dtype=np.int64)

    @classmethod
    def from_preprocessor_config(cls, path_or_dict: PathLike | Mapping[str, Any]) -> "VisionConfig":
        """Build from a HF ``preprocessor_config.json`` (a file, its directory, or
        the parsed dict).

        Qwen2/2.5-VL configs give top-level ``min_pixels``/``max_pixels``; Qwen3-VL
        gives ``size: {shortest_edge, longest_edge}``. As in transformers'
        ``Qwen2VLImageProcessor.__init__``, top-level keys win over ``size``.
        An Ovis2.5 file (``image_processor_type`` Ovis2_5ImageProcessor[Pil] or
        ``processor_class`` Ovis2_5Processor) takes Ovis2.5's rule and class defaults,
        its bounds from ``size`` only (``Ovis2_5ImageProcessorPil`` has no
        ``min_pixels``/``max_pixels`` keys) and its ``resample`` (default 2).
        Settings we do not reproduce (another resample filter, a disabled step)
        raise instead of silently producing pixels the model never saw.
        """
        raw = _read_image_processor_config(path_or_dict)
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(flag, True) is False:
                raise ValueError(f"preprocessor config sets {flag}=false, which vltune does not support")
        if _is_ovis(raw):
            return cls._from_ovis_config(raw)
        if raw.get("resample", _BICUBIC) != _BICUBIC:
            raise ValueError(f"only bicubic resampling (3) is supported, got resample={raw['resample']}")

        size = raw.get("size") or {}
        min_pixels = _first(raw.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"), cls.min_pixels)
        max_pixels = _first(raw.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"), cls.max_pixels)
        return cls(
            patch_size=int(raw.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", cls.merge_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(float(v) for v in raw.get("image_mean", cls.image_mean)),
            image_std=tuple(float(v) for v in raw.get("image_std", cls.image_std)),
            rescale_factor=float(raw.get("rescale_factor", cls.rescale_factor)),
        )

    @classmethod
    def _from_ovis_config(cls, raw: Mapping[str, Any]) -> "VisionConfig":
        """An Ovis2.5 processor dict over ``Ovis2_5ImageProcessorPil``'s class defaults (null = default)."""
        base = cls.ovis()
        return replace(base, **ovis_pixel_settings(raw, base, "preprocessor"))


def _read_image_processor_config(path_or_dict: PathLike | Mapping[str, Any]) -> dict:
    """The image processor dict: given, a JSON file, or a model directory's
    ``preprocessor_config.json`` (else ``processor_config.json``'s ``image_processor`` entry,
    where transformers 5 saves it)."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        combined = path / "processor_config.json"
        if not (path / "preprocessor_config.json").is_file() and combined.is_file():
            processor = json.loads(combined.read_text(encoding="utf-8"))
            if isinstance(processor.get("image_processor"), Mapping):
                return {"processor_class": processor.get("processor_class"), **processor["image_processor"]}
        path = path / "preprocessor_config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _is_ovis(raw: Mapping[str, Any]) -> bool:
    """Whether a processor dict names Ovis2.5's image processor (or its combined processor)."""
    return raw.get("image_processor_type") in _OVIS_IMAGE_PROCESSORS or raw.get("processor_class") == "Ovis2_5Processor"


def ovis_pixel_settings(raw: Mapping[str, Any], base: Any, what: str) -> dict[str, Any]:
    """The pixel settings an Ovis2.5 image or video processor dict sets over `base`'s (null = default):
    one reader for both, as both processors share them. Bounds come from ``size`` only (the Ovis
    processors have no top-level min/max_pixels keys); a filter other than 2 or 3 is refused."""
    size = raw.get("size") or {}
    resample = int(_first(raw.get("resample"), base.resample))
    if resample not in _RESAMPLES["Ovis2_5ImageProcessor"]:
        raise ValueError(f"Ovis2.5 {what} config sets resample={resample}; vltune reproduces only "
                         f"2 (bilinear, Ovis2.5's default) and 3 (bicubic)")
    return dict(
        patch_size=int(_first(raw.get("patch_size"), base.patch_size)),
        temporal_patch_size=int(_first(raw.get("temporal_patch_size"), base.temporal_patch_size)),
        merge_size=int(_first(raw.get("merge_size"), base.merge_size)),
        min_pixels=int(_first(size.get("shortest_edge"), base.min_pixels)),
        max_pixels=int(_first(size.get("longest_edge"), base.max_pixels)),
        image_mean=tuple(float(v) for v in _first(raw.get("image_mean"), base.image_mean)),
        image_std=tuple(float(v) for v in _first(raw.get("image_std"), base.image_std)),
        rescale_factor=float(_first(raw.get("rescale_factor"), base.rescale_factor)),
        resample=resample,
    )


def _first(*values: Any) -> Any:
    """First value that is not None (a present-but-null key does not win)."""
    return next(v for v in values if v is not None)


class ImageLoadError(ValueError):
    """An image file that cannot be used; carries ``path`` and ``reason`` so a
    data-loading report can list bad samples instead of crashing on the first."""

    def __init__(self, path: PathLike, reason: str, kind: str = "corrupt_media") -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.kind = kind
        """Problem class for the data report: missing_file | empty_file | corrupt_media | fetch_failed."""
        super().__init__(f"cannot load image {self.path!r}: {reason}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``, compositing any transparency onto white.

    Same rule as transformers' ``image_transforms.convert_to_rgb``: an alpha band
    or a palette/``transparency`` entry means alpha-composite over opaque white;
    every other mode (L, P, CMYK, YCbCr, I, ...) goes through ``convert("RGB")``.
    A plain ``convert("RGB")`` of RGBA would expose whatever colour hides under
    transparent pixels, often black.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


URL_TIMEOUT_S = 30.0
"""Seconds an http(s) image may take to answer (each socket operation: connect, each read)."""
URL_MAX_BYTES = 256 << 20
"""A URL's body above this is refused rather than read into memory."""


def file_problem(path: PathLike) -> tuple[str, str] | None:
    """(reason, problem class) when `path` is not a readable, non-empty regular file; None when it is.

    Shared with data/video.py. A symlink loop or a dangling link is named as such: "file not found"
    for a link that `ls` lists would send the user looking in the wrong place.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself); point it at the real file", "missing_file"
        if isinstance(e, FileNotFoundError) and p.is_symlink():
            return f"dangling symlink (it points to {os.readlink(p)!r}, which does not exist)", "missing_file"
        if isinstance(e, FileNotFoundError):
            return "file not found", "missing_file"
        return f"cannot read the file ({e.strerror})", "missing_file"
    if not p.is_file():
        return "not a regular file", "missing_file"
    if st.st_size == 0:
        return "file is empty (0 bytes)", "empty_file"
    return None


def fetch_url(url: str, timeout: float | None = None) -> bytes:
    """The body of an http(s) URL (stdlib urllib, `timeout` seconds per socket operation), or an
    ImageLoadError of kind `fetch_failed` that says why and what to do instead."""
    fix = "check the URL, or download the file and give its path"
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S if timeout is None else timeout) as response:
            body = response.read(URL_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ImageLoadError(url, f"fetching it failed (HTTP {e.code} {e.reason}); {fix}", "fetch_failed") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        # URLError is an OSError: refused, unknown host, timed out; ValueError: a bad URL;
        # HTTPException: a body cut short (IncompleteRead), a malformed status or header line.
        reason = getattr(e, "reason", None) or e
        raise ImageLoadError(url, f"fetching it failed ({reason}); {fix}", "fetch_failed") from None
    if len(body) > URL_MAX_BYTES:
        raise ImageLoadError(url, f"the response is larger than {URL_MAX_BYTES >> 20} MiB; {fix}", "fetch_failed")
    if not body:
        raise ImageLoadError(url, "the response is empty", "empty_file")
    return body


def is_url(ref: Any) -> bool:
    """Whether a media reference is an http(s) URL (fetched) rather than a path (joined onto data_path)."""
    return isinstance(ref, str) and ref.startswith(("http://", "https://"))


def url_cache_dir() -> Path:
    """Where fetched URLs are kept: $VLTUNE_CACHE/urls, else $XDG_CACHE_HOME (or ~/.cache)/vltune/urls."""
    if os.environ.get("VLTUNE_CACHE"):
        return Path(os.environ["VLTUNE_CACHE"]) / "urls"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vltune" / "urls"


def cached_url(url: str) -> "Path | bytes":
    """A local copy of `url`, fetched on its first use on this machine and read from disk afterwards.

    Without it every read downloads the whole body again: the header read of the length check, then
    each epoch, each worker and each evaluation. The copy is written under a temporary name and renamed
    into place, so concurrent workers and ranks never see half a file. Where the cache cannot be
    written, the body itself is returned (fetched again next time, but the run goes on).
    """
    path = url_cache_dir() / hashlib.sha256(url.encode()).hexdigest()
    try:
        if path.stat().st_size > 0:
            return path
    except OSError:
        pass
    body = fetch_url(url)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(body)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return body
    return path


def _open(path: "PathLike | bytes") -> Image.Image:
    """Open an image file, encoded image bytes (HF datasets cells) or an http(s) URL lazily, with clear errors."""
    if is_url(path):
        path = cached_url(path)
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise ImageLoadError("<bytes>", "image bytes are empty", "empty_file")
        return Image.open(io.BytesIO(path))
    problem = file_problem(path)
    if problem is not None:
        raise ImageLoadError(path, *problem)
    return Image.open(path)


def load_image(path: "PathLike | bytes") -> Image.Image:
    """Decode ``path`` (a file, or encoded bytes) fully, apply its EXIF orientation and return it as RGB.

    Phones store photos sideways plus an EXIF rotation tag; without
    ``exif_transpose`` the model would train on rotated images (transformers'
    and qwen-vl-utils' URL/path loaders both honour it). Decoding eagerly makes
    truncated files fail here, with the path, rather than deep inside a batch.
    """
    where = "<bytes>" if isinstance(path, (bytes, bytearray)) else path
    try:
        with _open(path) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
            return to_rgb(oriented)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageLoadError):
            raise
        # UnidentifiedImageError and "image file is truncated" are OSErrors.
        raise ImageLoadError(where, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size(path: "PathLike | bytes") -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only (no pixel decoding).

    Enough to count an image's tokens (smart_resize needs only the size), so length checks over a
    whole dataset stay cheap; a corrupt body is caught when the image is decoded for training.
    """
    where = "<bytes>" if isinstance(path, (bytes, bytearray)) else path
    try:
        with _open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            return height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageLoadError):
            raise
        raise ImageLoadError(where, f"cannot read image header ({type(exc).__name__}: {exc})") from exc


def _normalization_table(cfg: VisionConfig) -> np.ndarray:
    """[C, 256] float32: the normalised value of every uint8 level, with transformers' exact dtypes
    (multiply in float64, cast to float32, then ``(x - mean) / std`` in float32)."""
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


def _rescale_and_normalize(pixels: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """uint8 [..., C] -> normalized float32 [..., C], bit-identical to transformers' arithmetic.

    The input has only 256 levels per channel, so a lookup table computed with the processor's own
    dtypes gives the very same floats as the elementwise maths, several times faster.
    """
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    table = _normalization_table(cfg)
    planes = np.ascontiguousarray(np.moveaxis(pixels, -1, 0))  # channel-first: each lookup reads contiguously
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(table.shape[0]):
        out[c] = table[c][planes[c]]
    return np.moveaxis(out, 0, -1)  # a channel-last view; callers transpose it back for free


def _patchify(image_chw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, int, int]:
    """Flatten [C, H, W] into [grid_h * grid_w, C * T * P * P] rows.

    Rows are ordered by merge window: (block row, block column, row within the
    window, column within the window), so each ``merge_size**2`` consecutive
    rows are the patches the merger fuses into one LLM token. Within a row the
    order is (channel, time, patch y, patch x), matching the Conv3d patch
    embedding weights. A still image is repeated ``temporal_patch_size`` times.
    """
    c, h, w = image_chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    grid_h, grid_w = h // p, w // p
    x = image_chw.reshape(c, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    out = np.empty((*x.shape[:5], t, p, p), dtype=image_chw.dtype)
    for frame in range(t):  # one strided copy per temporal slot: faster than broadcast + reshape
        out[:, :, :, :, :, frame] = x
    return out.reshape(grid_h * grid_w, c * t * p * p), grid_h, grid_w


def preprocess_image(image: Image.Image, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(pixel_values, grid_thw)`` for one image, as transformers'
    ``Qwen2VLImageProcessorPil`` (or, for an Ovis2.5 config, ``Ovis2_5ImageProcessorPil``)
    would: ``pixel_values`` float32 [grid_h * grid_w, 3 * T * P * P] and ``grid_thw`` int64
    ``[1, grid_h, grid_w]``.

    The resize runs on the uint8 PIL image (as transformers does) so the filter's
    clamping and rounding to 0..255 match. The LLM sees
    ``grid_h * grid_w // merge_size**2`` image tokens.
    """
    rgb = to_rgb(image)
    height, width = cfg.resize_target(rgb.height, rgb.width)
    resized = rgb.resize((width, height), resample=cfg.resample)
    normalized = _rescale_and_normalize(np.asarray(resized), cfg)
    patches, grid_h, grid_w = _patchify(normalized.transpose(2, 0, 1), cfg)
    return patches, np.array([1, grid_h, grid_w], dtype=np.int64)
