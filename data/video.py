"""Video input for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Ovis2.5: decode, sample frames, patchify -- numpy only.

The vision tower must see the pixels transformers' video processors would give it, and the LLM
must see the same number of video tokens and the same time stamps, so every step here copies a
reference implementation and the tests compare against it (``tests/unit/data/test_video.py``):

* **Decoding** uses PyAV (``av``), not decord. decord's last release is from 2021 and ships no
  wheels for current Pythons (nor for aarch64/macOS arm), while PyAV is maintained, ships abi3
  wheels with FFmpeg (h264, hevc, vp9, av1, mpeg4) bundled, and is transformers' own default video
  backend. Frames are decoded in order and the i-th decoded frame is frame i; frames are converted
  with ``frame.to_ndarray(format="rgb24")``; the frame count is the stream header's and the frame
  rate is ``average_rate`` -- all exactly as transformers' ``read_video_pyav``
  (``transformers.video_utils.load_video(backend="pyav")``). Note that a video *path* given to a
  transformers video processor is decoded with torchcodec instead, whose RGB conversion is not
  guaranteed to produce the same bytes; parity checks feed both sides the same decoded frames.
* **Sampling.** Qwen2-VL / Qwen2.5-VL follow the qwen-vl-finetune recipe (its ``base_interval``,
  ``video_min_frames``, ``video_max_frames``): ``n = round(duration / base_interval)`` clamped to
  [min, max], indices ``unique(linspace(0, N-1, n).astype(int))``. Qwen3-VL follows
  ``Qwen3VLVideoProcessor.sample_frames``: ``n = int(N / video_fps * fps)`` clamped to [min, max, N],
  indices ``round(linspace(0, N-1, n))``. A video with fewer than ``min_frames`` frames is an error
  (``kind="video_too_short"``) instead of the silent shorter clip both references produce.
* **Time.** ``second_per_grid_ts = temporal_patch_size / (len(indices) / N * video_fps)``, the
  expression of transformers' ``Qwen2_5_VLProcessor`` (``VideoMetadata.sampled_fps``). The
  qwen-vl-finetune script writes it as ``len / (N / video_fps)``: equal in exact arithmetic but
  a last-bit different in about a quarter of cases (3 s at 25 fps, 4 frames: 1.4999999999999998 vs
  1.5), which can move a float64 ``int(t * spt * tokens_per_second)`` across an integer; we side with
  transformers (whose BatchFeature then carries the value as float32). Qwen3-VL's
  ``<t seconds>`` stamps are ``Qwen3VLProcessor._calculate_timestamps``: ``index / video_fps`` per
  sampled frame, the list padded with its last index to a multiple of temporal_patch_size, then the
  mean of the first and last stamp of each temporal patch.
* **Pixels.** ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``: smart_resize (per frame for
  Qwen2; Qwen3's version bounds frames x height x width and first scales up sides below the patch
  factor), resize, fused rescale+normalise ``(x - mean/rescale) / (std/rescale)`` in float32, the
  frame count padded to a multiple of temporal_patch_size by repeating the last frame, patches in
  merge-window order. Their resize is ``torchvision.transforms.v2.functional.resize(bicubic,
  antialias=True)`` on uint8 CPU tensors, which torchvision hands straight to ATen's uint8
  ``_upsample_bicubic2d_aa`` (no float round trip): a separable Keys cubic (a = -0.5, PIL's
  filter), horizontal pass first, weights computed in float64, normalised, then quantised to int16
  with a per-pass precision, integer accumulation with +0.5 rounding, ``>> precision``, clamp to
  0..255 and a uint8 intermediate between passes. ``resize_bicubic_aa`` reproduces that integer
  arithmetic, so it is bit-exact -- checked against ``torch.nn.functional.interpolate`` on uint8
  under torch's DEFAULT, AVX2 and AVX512 kernels. (Given ``device="cuda"`` the processor resizes in
  float32 then clamps and rounds instead; that path is not reproduced: on an H100 it differed from
  the CPU path in 21.5% (Qwen2-VL) / 0.85% (Qwen3-VL) of values, by up to 6-7 uint8 levels.
  Processors run on CPU unless given a ``device``.)

Ovis2.5 (``VideoConfig.processor == "Ovis2_5VideoProcessor"``; tests in ``tests/unit/data/test_video_ovis.py``,
GPU-machine parity in ``tools/gpu/parity_ovis_video.py``):

* **Sampling.** ``Ovis2_5VideoProcessor`` samples nothing (``do_sample_frames=False``): the caller hands
  it the frames. We follow the official Ovis training recipe (AIDC-AI/Ovis,
  ``ovis/train/dataset/multimodal_dataset.py``, ``MultimodalDataset.read_video._sampling_idx``): a video
  of N frames with ``min_frames <= N <= max_frames`` gives all its frames; otherwise
  ``n = min_frames`` (N too small: frames repeat) or ``max_frames`` (N too large), ``stride = N / n``
  and frame i is ``min(N - 1, (round(stride*i) + round(stride*(i+1))) // 2)`` (numpy's half-to-even
  round), i.e. the middle of each of n equal segments. ``min_frames`` / ``max_frames`` come from the
  recipe's ``video_min_frames`` / ``video_max_frames``, else from the processor config, else Ovis's
  training defaults (8 and 8). Unlike the Qwen rules a clip shorter than ``min_frames`` is no error:
  the recipe repeats frames, and so do we. (Ovis counts N as ``int(fps * duration)`` through moviepy;
  we use the stream header's count, as for Qwen, which can differ by a frame on odd containers.)
  transformers' ``load_video(num_frames=n)`` rule (``arange(0, N, N / n).astype(int)``, segment
  starts, refusing n > N) is not used: it is an inference convenience, not what Ovis trained on.
* **Pixels.** Per-frame Ovis ``smart_resize`` (``vision.smart_resize_ovis``; bounds are per frame,
  defaults 448*448 .. 1344*1792 from ``size``), torchvision resize with ``resample`` 2 (bilinear,
  antialias=True; 3 is accepted too), the fused rescale+normalise above with mean/std 0.5,
  ``temporal_patch_size`` 1 so grid_t is the frame count, patches in ``Ovis2_5VideoProcessor.patchify``
  order (the same merge-window order as Qwen's). torchvision's bilinear resize of uint8 has two CPU
  paths (``_do_native_uint8_resize_on_cpu``): ATen's uint8 kernel, integer arithmetic like the bicubic
  one (``resize_bilinear_aa``, data/frame_resize.py), or float32 interpolation rounded half-to-even and
  cast back (``resize_bilinear_aa_float``); which one runs depends on the host's torch CPU capability.
  ``VideoConfig.bilinear_path`` picks which one we reproduce. Measured on the lent H100 host (AVX512,
  torch 2.11, torchvision 0.26; tools/gpu/parity_ovis_video.py, docs/bench/h100-2026-12-07-ovis/): the
  processor's frames equal ``resize_bilinear_aa`` (the integer kernel) in 21 of 21 cases under the
  host's native and AVX2 capabilities and ``resize_bilinear_aa_float`` in 21 of 21 under DEFAULT. So
  "uint8" is the default; "float" is for hosts whose torch capability is DEFAULT. The two differ by one
  uint8 level in 15-20% of values. ``resize_bilinear_aa`` is bit-exact with ATen's uint8 kernel under
  every capability; ``resize_bilinear_aa_float`` with ATen's scalar (DEFAULT) float kernel.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from ..core.families import get_family, read_config
from .frame_resize import resize_bicubic_aa, resize_bilinear_aa, resize_bilinear_aa_float
from .vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, file_problem, ovis_pixel_settings, smart_resize, smart_resize_ovis

PathLike = Union[str, "os.PathLike[str]"]
_BILINEAR = 2  # PILImageResampling.BILINEAR, Ovis2.5's filter
_BICUBIC = 3  # PILImageResampling.BICUBIC, the only filter the Qwen video processors use
_RESAMPLES = {"Qwen2VLVideoProcessor": (_BICUBIC,), "Qwen3VLVideoProcessor": (_BICUBIC,),
              "Ovis2_5VideoProcessor": (_BILINEAR, _BICUBIC)}
"""torchvision filters reproduced per processor (2 = bilinear, 3 = bicubic)."""

# Class defaults of transformers' Qwen2VLVideoProcessor / Qwen3VLVideoProcessor (5.23), used for
# any key a model's processor config leaves out.
_QWEN2_DEFAULTS: dict[str, Any] = dict(
    patch_size=14, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28,
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, fps=None, max_video_tokens=128000,
)
_QWEN3_DEFAULTS: dict[str, Any] = dict(
    patch_size=16, min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), fps=2.0, max_video_tokens=768,
)
# Ovis2_5VideoProcessor's class defaults; frame counts are the Ovis training recipe's (min = max = 8).
_OVIS_DEFAULTS: dict[str, Any] = dict(
    patch_size=16, temporal_patch_size=1, min_pixels=448 * 448, max_pixels=1344 * 1792,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), fps=None, max_video_tokens=128000,
    min_frames=8, max_frames=8, resample=_BILINEAR,
)
# Recipe key (DataArgs / qwen-vl-finetune) -> VideoConfig field.
RECIPE_KEYS = {
    "video_min_pixels": "min_pixels",
    "video_max_pixels": "max_pixels",
    "video_min_frames": "min_frames",
    "video_max_frames": "max_frames",
    "base_interval": "base_interval",
    "video_fps": "fps",
}


class VideoLoadError(ValueError):
    """A video that cannot be used. Carries ``path``, ``reason`` and ``kind`` (the data report's
    problem class: missing_file | empty_file | corrupt_media | video_too_short)."""

    def __init__(self, path: PathLike | str, reason: str, kind: str = "corrupt_media") -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"cannot load video {self.path!r}: {reason}")


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoConfig:
    """How videos are sampled and patchified. Defaults: transformers' ``Qwen2VLVideoProcessor``
    class defaults, with qwen-vl-finetune's ``base_interval`` of 2 s."""

    processor: str = "Qwen2VLVideoProcessor"
    """Whose rules: Qwen2VLVideoProcessor (interval sampling, per-frame pixel bounds), Qwen3VLVideoProcessor
    (fps sampling, bounds on frames x height x width) or Ovis2_5VideoProcessor (Ovis's segment-middle
    sampling of min..max frames, per-frame bounds, bilinear); a family's `media.video_processor`."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    """Qwen2/2.5: bounds of one resized frame's h*w. Qwen3: bounds of frames*h*w (its smart_resize)."""
    max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    base_interval: float = 2.0
    """Qwen2/2.5: seconds between sampled frames (qwen-vl-finetune's rule)."""
    fps: float | None = None
    """Qwen3: frames sampled per second of video (Qwen3VLVideoProcessor's rule)."""
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    """transformers' qwen-vl-utils-style cap of per-frame pixels by a whole-video token budget."""
    max_video_tokens: int = 128000
    resample: int = _BICUBIC
    """torchvision filter of the resize: 3 bicubic (Qwen); Ovis2.5 uses 2, bilinear."""
    bilinear_path: str = "uint8"
    """Which of torchvision's two CPU paths for a uint8 bilinear resize to reproduce: "uint8" (ATen's
    integer kernel: what the processor gave on the AVX512 and AVX2 capabilities of the GPU host) or
    "float" (float32 interpolate, round, cast: torch's DEFAULT capability). See the module docstring."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Processor config keys not used here, kept for reference."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "min_frames", "max_frames"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            problems.append(f"video min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if self.min_frames > self.max_frames:
            problems.append(f"video_min_frames ({self.min_frames}) > video_max_frames ({self.max_frames})")
        if not self.base_interval > 0:
            problems.append(f"base_interval must be > 0 seconds, got {self.base_interval}")
        if self.processor not in _RESAMPLES:
            problems.append(f"unknown video processor {self.processor!r}; expected one of {sorted(_RESAMPLES)}")
        elif self.resample not in _RESAMPLES[self.processor]:
            problems.append(
                f"resample={self.resample} is not reproduced for {self.processor}; supported: "
                f"{_RESAMPLES[self.processor]} (2 = bilinear, 3 = bicubic)"
            )
        if self.bilinear_path not in ("float", "uint8"):
            problems.append(f"bilinear_path must be 'float' or 'uint8', got {self.bilinear_path!r}")
        if self.is_qwen3 and not (self.fps and self.fps > 0):
            problems.append(f"Qwen3-VL video sampling needs fps > 0, got {self.fps}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            problems.append("image_mean and image_std must have 3 (RGB) entries")
        if problems:
            raise ValueError("invalid video config: " + "; ".join(problems))

    @property
    def is_qwen3(self) -> bool:
        return self.processor == "Qwen3VLVideoProcessor"

    @property
    def is_ovis(self) -> bool:
        return self.processor == "Ovis2_5VideoProcessor"

    @classmethod
    def ovis(cls, **changes: Any) -> "VideoConfig":
        """``Ovis2_5VideoProcessor``'s class defaults plus Ovis's training frame counts, with ``changes``."""
        d = _OVIS_DEFAULTS
        base = dict(
            processor="Ovis2_5VideoProcessor", patch_size=d["patch_size"], temporal_patch_size=d["temporal_patch_size"],
            min_pixels=d["min_pixels"], max_pixels=d["max_pixels"], image_mean=d["image_mean"], image_std=d["image_std"],
            fps=d["fps"], min_frames=d["min_frames"], max_frames=d["max_frames"], resample=d["resample"],
            max_video_tokens=d["max_video_tokens"],
        )
        return cls(**{**base, **changes})

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(
        cls, source: PathLike | Mapping[str, Any], model_type: str | None = None, **recipe: Any
    ) -> "VideoConfig":
        """Build from a model directory (or a processor JSON file / parsed dict) plus recipe keys.

        A directory is read as transformers' ``AutoVideoProcessor`` does: ``processor_config.json``'s
        ``video_processor`` entry, else ``video_preprocessor_config.json``, else the image
        ``preprocessor_config.json`` (Qwen2/2.5-VL releases ship only that one, so their video pixel
        bounds are the image ones). ``model_type`` (a family, whose ``media.video_processor`` picks the
        rules) defaults to the directory's ``config.json``; a bare processor JSON names its class.
        ``recipe`` takes the recipe's names (``video_min_pixels``, ``video_max_pixels``,
        ``video_min_frames``, ``video_max_frames``, ``base_interval``, ``video_fps``); None means
        "keep the processor's value". For Qwen3-VL a ``base_interval`` sets fps = 1 / base_interval.
        """
        raw, processor = _read_video_processor_config(source, model_type)
        qwen3 = processor == "Qwen3VLVideoProcessor"
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(flag, True) is False:
                raise ValueError(f"video processor config sets {flag}=false, which vltune does not support")
        if processor == "Ovis2_5VideoProcessor":
            return cls._from_ovis_config(raw).with_recipe(**recipe)
        if raw.get("resample", _BICUBIC) != _BICUBIC:
            raise ValueError(f"only bicubic video resampling (3) is supported, got resample={raw['resample']}")

        defaults = _QWEN3_DEFAULTS if qwen3 else _QWEN2_DEFAULTS
        size = raw.get("size") or {}
        min_pixels, max_pixels = size.get("shortest_edge"), size.get("longest_edge")
        if not qwen3:  # Qwen2VLVideoProcessor.__init__ lets top-level min/max_pixels override size
            min_pixels = _first(raw.get("min_pixels"), min_pixels)
            max_pixels = _first(raw.get("max_pixels"), max_pixels)
        fps = _first(raw.get("fps"), defaults["fps"])
        used = {"size", "min_pixels", "max_pixels", "fps", "patch_size", "temporal_patch_size", "merge_size",
                "image_mean", "image_std", "rescale_factor", "min_frames", "max_frames",
                "cap_pixels_per_frame", "max_video_tokens"}
        cfg = cls(
            processor=processor,
            patch_size=int(_first(raw.get("patch_size"), defaults["patch_size"])),
            temporal_patch_size=int(_first(raw.get("temporal_patch_size"), 2)),
            merge_size=int(_first(raw.get("merge_size"), 2)),
            min_pixels=int(_first(min_pixels, defaults["min_pixels"])),
            max_pixels=int(_first(max_pixels, defaults["max_pixels"])),
            image_mean=tuple(float(v) for v in _first(raw.get("image_mean"), defaults["image_mean"])),
            image_std=tuple(float(v) for v in _first(raw.get("image_std"), defaults["image_std"])),
            rescale_factor=float(_first(raw.get("rescale_factor"), 1 / 255)),
            base_interval=1.0 / float(fps) if (fps and not qwen3) else 2.0,
            fps=None if fps is None else float(fps),
            min_frames=int(_first(raw.get("min_frames"), 4)),
            max_frames=int(_first(raw.get("max_frames"), 768)),
            cap_pixels_per_frame=bool(raw.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(_first(raw.get("max_video_tokens"), defaults["max_video_tokens"])),
            extra={k: v for k, v in raw.items() if k not in used},
        )
        return cfg.with_recipe(**recipe)

    @classmethod
    def _from_ovis_config(cls, raw: Mapping[str, Any]) -> "VideoConfig":
        """An Ovis2.5 video processor dict over ``VideoConfig.ovis()`` (null = default). Bounds come
        from ``size`` only: ``Ovis2_5VideoProcessor`` has no top-level min/max_pixels keys."""
        base = cls.ovis()
        used = {"size", "resample", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                "rescale_factor", "min_frames", "max_frames"}
        return replace(
            base, **ovis_pixel_settings(raw, base, "video processor"),
            min_frames=int(_first(raw.get("min_frames"), base.min_frames)),
            max_frames=int(_first(raw.get("max_frames"), base.max_frames)),
            extra={k: v for k, v in raw.items() if k not in used},
        )

    def with_recipe(self, **recipe: Any) -> "VideoConfig":
        """Apply recipe overrides by their recipe names (None = unset)."""
        unknown = sorted(set(recipe) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"unknown video recipe key(s) {unknown}; expected some of {sorted(RECIPE_KEYS)}")
        changes = {RECIPE_KEYS[k]: v for k, v in recipe.items() if v is not None}
        if self.is_qwen3 and "base_interval" in changes:
            changes.setdefault("fps", 1.0 / float(changes["base_interval"]))
        for name in ("min_pixels", "max_pixels", "min_frames", "max_frames"):
            if name in changes:
                changes[name] = int(changes[name])
        for name in ("base_interval", "fps"):
            if name in changes:
                changes[name] = float(changes[name])
        return replace(self, **changes) if changes else self


def _first(*values: Any) -> Any:
    """First value that is not None (a present-but-null key does not win)."""
    return next((v for v in values if v is not None), None)


def _read_video_processor_config(source: PathLike | Mapping[str, Any], model_type: str | None) -> tuple[dict, str]:
    """(the processor JSON, the video processor class whose rules apply)."""
    if isinstance(source, Mapping):
        raw = dict(source)
        directory = None
    else:
        path = Path(source)
        directory = path if path.is_dir() else None
        if directory is not None:
            raw = None
            processor = directory / "processor_config.json"
            if processor.is_file():
                raw = json.loads(processor.read_text(encoding="utf-8")).get("video_processor")
            for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
                if raw is None and (directory / name).is_file():
                    raw = json.loads((directory / name).read_text(encoding="utf-8"))
            if raw is None:
                raise ValueError(f"{directory} has no video_preprocessor_config.json or preprocessor_config.json")
        else:
            raw = json.loads(path.read_text(encoding="utf-8"))
    if model_type is None and directory is not None and (directory / "config.json").is_file():
        model_type = read_config(directory).get("model_type")
    if model_type is not None:
        return raw, get_family(model_type).media.video_processor
    kinds = " ".join(str(raw.get(k, "")) for k in ("video_processor_type", "processor_class", "image_processor_type"))
    if "Ovis2_5" in kinds:
        return raw, "Ovis2_5VideoProcessor"
    return raw, "Qwen3VLVideoProcessor" if "Qwen3VL" in kinds else "Qwen2VLVideoProcessor"


# --- frame sampling ------------------------------------------------------------------------------


def interval_frame_indices(
    total_frames: int, video_fps: float, base_interval: float, min_frames: int, max_frames: int
) -> np.ndarray:
    """qwen-vl-finetune's Qwen2.5-VL rule: one frame per ``base_interval`` seconds, clamped to
    [min_frames, max_frames], spread uniformly with ``linspace(..., dtype=int)`` and de-duplicated
    (a clip with fewer frames than asked for yields each frame once)."""
    duration = total_frames / video_fps
    target = min(max(round(duration / base_interval), min_frames), max_frames)
    return np.unique(np.linspace(0, total_frames - 1, target).astype(np.int64))


def fps_frame_indices(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """``Qwen3VLVideoProcessor.sample_frames``: ``fps`` frames per second of video, clamped to
    [min_frames, max_frames] and to the frame count, at ``round(linspace(0, N-1, n))``."""
    num = int(total_frames / video_fps * fps)
    num = min(max(num, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, num).round().astype(np.int64)


def segment_frame_indices(total_frames: int, min_frames: int, max_frames: int) -> np.ndarray:
    """Ovis2.5's training rule (``MultimodalDataset.read_video._sampling_idx``): every frame when the
    count is within [min_frames, max_frames], else the middle frame of each of ``min_frames`` (frames
    then repeat) or ``max_frames`` equal segments, with numpy's half-to-even rounding of the bounds."""
    if min_frames <= total_frames <= max_frames:
        return np.arange(total_frames, dtype=np.int64)
    target = min_frames if total_frames < min_frames else max_frames
    stride = total_frames / target
    ids = [
        min(total_frames - 1, (int(np.round(stride * i)) + int(np.round(stride * (i + 1)))) // 2)
        for i in range(target)
    ]
    return np.asarray(ids, dtype=np.int64)


def sample_frame_indices(total_frames: int, video_fps: float, cfg: VideoConfig) -> np.ndarray:
    """The frame indices ``cfg``'s model family samples from a video of ``total_frames`` at ``video_fps``."""
    if cfg.is_ovis:
        return segment_frame_indices(total_frames, cfg.min_frames, cfg.max_frames)
    if cfg.is_qwen3:
        return fps_frame_indices(total_frames, video_fps, float(cfg.fps), cfg.min_frames, cfg.max_frames)
    return interval_frame_indices(total_frames, video_fps, cfg.base_interval, cfg.min_frames, cfg.max_frames)


def second_per_grid_t(num_sampled: int, total_frames: int, video_fps: float, temporal_patch_size: int) -> float:
    """Seconds covered by one temporal patch (Qwen2.5-VL's M-RoPE time step), written as
    transformers does: ``tps / (len(indices) / total_frames * fps)``."""
    sampled_fps = num_sampled / total_frames * video_fps
    return temporal_patch_size / sampled_fps


def patch_timestamps(indices: np.ndarray | list[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Qwen3-VL's ``<t seconds>`` value of each temporal patch (``Qwen3VLProcessor._calculate_timestamps``)."""
    idx = [int(i) for i in indices]
    if len(idx) % temporal_patch_size:
        idx.extend(idx[-1] for _ in range(temporal_patch_size - len(idx) % temporal_patch_size))
    stamps = [i / video_fps for i in idx]
    return [(stamps[i] + stamps[i + temporal_patch_size - 1]) / 2 for i in range(0, len(stamps), temporal_patch_size)]


# --- decoding ------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """Sampled frames of one video: ``frames`` uint8 [T, H, W, 3] at source ``frame_indices`` [T]."""

    frames: np.ndarray
    frame_indices: np.ndarray
    fps: float
    """The source's average frame rate (PyAV ``average_rate``)."""
    total_frames: int
    path: str = "<array>"

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled frame (``index / fps``, as transformers' VideoMetadata)."""
        return [int(i) / self.fps for i in self.frame_indices]

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


def _import_av():
    try:
        import av
    except ImportError as exc:  # an optional dependency (the `data` extra)
        raise ImportError("reading videos needs PyAV: pip install av (or vltune[data])") from exc
    return av


def _open(path: PathLike | bytes):
    """Open a container with the errors of ``vision.load_image`` (missing / empty / undecodable)."""
    av = _import_av()
    where = "<bytes>" if isinstance(path, (bytes, bytearray)) else path
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise VideoLoadError(where, "video bytes are empty", "empty_file")
        source: Any = io.BytesIO(path)
    else:
        problem = file_problem(path)
        if problem is not None:
            raise VideoLoadError(path, *problem)
        source = os.fspath(path)
    try:
        container = av.open(source)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoLoadError(where, f"cannot open video ({type(exc).__name__}: {exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoLoadError(where, "file has no video stream")
    return container


def probe_video(path: PathLike | bytes) -> tuple[int, float]:
    """(frame count, frames per second) from the container, decoding nothing.

    The count is the stream header's, as transformers' PyAV reader uses; containers that leave it
    out (Matroska/WebM) are counted by demuxing packets, one per frame for video codecs.
    """
    av = _import_av()
    where = "<bytes>" if isinstance(path, (bytes, bytearray)) else path
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or float(rate) <= 0:
            raise VideoLoadError(where, "the container gives no frame rate")
        total = int(stream.frames or 0)
        if total <= 0:
            try:
                total = sum(1 for packet in container.demux(stream) if packet.size)
            except (av.FFmpegError, ValueError) as exc:
                raise VideoLoadError(where, f"cannot read packets ({type(exc).__name__}: {exc})") from exc
        if total <= 0:
            raise VideoLoadError(where, "video stream has no frames")
        return total, float(rate)


def decode_frames(path: PathLike | bytes, indices: np.ndarray | list[int]) -> np.ndarray:
    """RGB frames [len(indices), H, W, 3] uint8 at the given frame indices (in the order given).

    Decodes in order up to the last index, converting only the wanted frames, exactly as
    transformers' ``read_video_pyav``. Frame-accurate, unlike keyframe seeking; long videos pay
    for decoding every frame up to the last one sampled (which is the last frame for uniform
    sampling anyway).
    """
    av = _import_av()
    where = "<bytes>" if isinstance(path, (bytes, bytearray)) else path
    wanted = {int(i) for i in indices}
    if not wanted or min(wanted) < 0:
        raise ValueError(f"frame indices must be non-negative and non-empty, got {list(indices)[:8]}")
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    decoded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-threaded decoding: same frames, faster
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except (av.FFmpegError, ValueError) as exc:
            raise VideoLoadError(where, f"cannot decode frame {decoded} ({type(exc).__name__}: {exc})") from exc
    if len(got) < len(wanted):
        raise VideoLoadError(where, f"only {decoded} frame(s) decodable but frame {last} was needed (truncated file?)")
    shapes = {a.shape for a in got.values()}
    if len(shapes) > 1:
        raise VideoLoadError(where, f"frame size changes inside the video: {sorted(shapes)}")
    return np.stack([got[int(i)] for i in indices])


def load_video(path: PathLike | bytes, cfg: VideoConfig) -> VideoClip:
    """Probe, sample (``cfg``'s model family rule) and decode one video.

    Raises ``VideoLoadError`` naming the path: missing / empty / undecodable / truncated files,
    and (``kind="video_too_short"``) clips with fewer than ``cfg.min_frames`` frames (not for
    Ovis2.5, whose rule repeats frames), or fewer than ``temporal_patch_size`` sampled frames for
    Qwen3-VL (whose processor rejects those).
    """
    where = "<bytes>" if isinstance(path, (bytes, bytearray)) else os.fspath(path)
    total, fps = probe_video(path)
    if total < cfg.min_frames and not cfg.is_ovis:  # Ovis's rule repeats frames instead
        raise VideoLoadError(
            where,
            f"video has {total} frame(s) ({total / fps:.2f} s at {fps:g} fps), fewer than video_min_frames={cfg.min_frames}",
            "video_too_short",
        )
    indices = sample_frame_indices(total, fps, cfg)
    if cfg.is_qwen3 and len(indices) < cfg.temporal_patch_size:
        raise VideoLoadError(
            where, f"{len(indices)} sampled frame(s), Qwen3-VL needs at least {cfg.temporal_patch_size}", "video_too_short"
        )
    return VideoClip(decode_frames(path, indices), indices, fps, total, where)


def resize_frames(frames: np.ndarray, height: int, width: int, cfg: VideoConfig) -> np.ndarray:
    """uint8 frames resized with ``cfg``'s filter, as its transformers video processor does on CPU."""
    if cfg.resample == _BICUBIC:
        return resize_bicubic_aa(frames, height, width)
    if cfg.bilinear_path == "uint8":
        return resize_bilinear_aa(frames, height, width)
    return resize_bilinear_aa_float(frames, height, width)


# --- preprocessing ---------------------------------------------------------------------------------


def smart_resize_qwen3_video(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL's video ``smart_resize``: like the image one, but the pixel bounds apply to
    frames x height x width, and sides below ``factor`` are first scaled up (a line-for-line copy)."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_resize_target(num_frames: int, height: int, width: int, cfg: VideoConfig) -> tuple[int, int]:
    """(height, width) every frame is resized to, as the family's video processor ``resize`` picks it."""
    if cfg.is_ovis:  # per frame; Ovis2_5VideoProcessor passes num_frames but its smart_resize ignores it
        return smart_resize_ovis(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    max_pixels = cfg.max_pixels
    if cfg.is_qwen3:
        if cfg.cap_pixels_per_frame:
            frame_cap = cfg.max_video_tokens * cfg.factor * cfg.factor
            per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_qwen3_video(
            num_frames, height, width, cfg.temporal_patch_size, cfg.factor, cfg.min_pixels, max_pixels
        )
    if cfg.cap_pixels_per_frame:
        total_pixels = int(cfg.max_video_tokens * cfg.factor * cfg.factor * 0.9)
        max_pixels = max(min(max_pixels, total_pixels * cfg.temporal_patch_size // num_frames), int(cfg.min_pixels * 1.05))
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, max_pixels)


def _normalize(frames: np.ndarray, cfg: VideoConfig) -> np.ndarray:
    """uint8 -> float32 with the video processors' fused rescale+normalise: mean and std are
    divided by the rescale factor (float32 tensors times 1/rescale), then ``(x - mean) / std``
    in float32 -- a different rounding from the image path's ``x * rescale`` in float64."""
    inv = np.float32(1.0 / cfg.rescale_factor)
    mean = np.asarray(cfg.image_mean, dtype=np.float32) * inv
    std = np.asarray(cfg.image_std, dtype=np.float32) * inv
    return (frames.astype(np.float32) - mean) / std


def _patchify(video: np.ndarray, cfg: VideoConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, H, W, C] float32 -> [grid_t * grid_h * grid_w, C * tps * P * P], padding T to a multiple
    of temporal_patch_size with copies of the last frame; rows in (t, merge-window row, merge-window
    column, row within window, column within window) order, each row (channel, time, y, x)."""
    tps, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -len(video) % tps:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    t, h, w, c = video.shape
    gt, gh, gw = t // tps, h // p, w // p
    x = video.transpose(0, 3, 1, 2).reshape(gt, tps, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tps * p * p)), (gt, gh, gw)


def preprocess_video(clip: VideoClip, cfg: VideoConfig) -> tuple[np.ndarray, np.ndarray, float, list[float]]:
    """``(pixel_values_videos, video_grid_thw, second_per_grid_ts, timestamps)`` of one clip.

    ``pixel_values_videos`` float32 [grid_t * grid_h * grid_w, 3 * tps * P * P] and
    ``video_grid_thw`` int64 [3] equal transformers' video processor output for the same frames;
    ``second_per_grid_ts`` is Qwen2.5-VL's time step per temporal patch; ``timestamps`` [grid_t]
    are Qwen3-VL's ``<t seconds>`` values. The LLM sees grid_t * grid_h * grid_w / merge**2 tokens.
    """
    frames = clip.frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{clip.path}: expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = video_resize_target(len(frames), frames.shape[1], frames.shape[2], cfg)
    resized = resize_frames(frames, height, width, cfg)
    pixel_values, grid = _patchify(_normalize(resized, cfg), cfg)
    tps = cfg.temporal_patch_size
    spt = second_per_grid_t(len(clip.frame_indices), clip.total_frames, clip.fps, tps)
    return pixel_values, np.array(grid, dtype=np.int64), spt, patch_timestamps(clip.frame_indices, clip.fps, tps)
