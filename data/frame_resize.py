"""Bit-exact numpy reproductions of the resizes transformers' video processors run on uint8 frames on CPU
(torch / torchvision, antialiased): ATen's integer-weight separable kernel, bicubic (Qwen's video
processors) and bilinear, and torchvision's float32 bilinear path (Ovis2.5 on a host whose torch CPU
capability is DEFAULT). data/video.py picks one per model family (`resize_frames`).
"""

from __future__ import annotations

import math

import numpy as np




def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (ATen's ``aa_filter`` for antialiased bicubic),
    evaluated in ATen's operation order so the float64 weights match to the last bit."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    """The linear (tent) kernel of ATen's antialiased bilinear: ``1 - |x|`` inside (-1, 1)."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_keys_cubic, 2.0), "bilinear": (_triangle, 1.0)}
"""mode -> (kernel, half its support: ATen's ``interp_size * 0.5``)."""


def _aa_int16_weights(in_size: int, out_size: int, mode: str = "bicubic") -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices [out, K], int16-valued weights [out, K] and precision bits of one resize pass.

    Mirrors ATen ``HelperInterpBase::_compute_indices_min_size_weights_aa`` and
    ``_compute_index_ranges_int16_weights``: the filter support widens with the downscale factor
    (that is the antialiasing), each output's weights are normalised to sum 1, and all weights are
    scaled by 2**precision with the largest precision (< 22) that keeps the biggest weight in int16.
    """
    kernel, half = _FILTERS[mode]
    scale = in_size / out_size
    support = half * scale if scale >= 1.0 else half
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, taps)
    j = np.arange(taps)
    x = ((j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale
    w = np.where(j[None, :] < xsize[:, None], kernel(x), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # left-to-right, as the C loop sums
        total = total + w[:, k]
    nonzero = total != 0.0
    w = np.where(nonzero[:, None], w / np.where(nonzero, total, 1.0)[:, None], w)
    wt_max = max(0.0, float(w.max()))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    weights = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    index = np.minimum(xmin[:, None] + j[None, :], in_size - 1)  # padded taps carry weight 0
    used = int(xsize.max())
    return index[:, :used], weights[:, :used], precision


def _resize_pass(x: np.ndarray, axis: int, out_size: int, mode: str = "bicubic") -> np.ndarray:
    """One separable pass over ``axis`` of an int32 [C, H, W] image: integer multiply-accumulate
    with the +0.5 rounding term, ``>> precision``, clamp to 0..255 (ATen ``basic_loop_aa_*<uint8_t>``)."""
    index, weights, precision = _aa_int16_weights(x.shape[axis], out_size, mode)
    shape = list(x.shape)
    shape[axis] = out_size
    acc = np.full(shape, 1 << (precision - 1), dtype=np.int32)
    term = np.empty(shape, dtype=np.int32)
    for k in range(index.shape[1]):
        w = weights[:, k] if axis == x.ndim - 1 else weights[:, k][:, None]
        np.multiply(np.take(x, index[:, k], axis=axis), w, out=term)
        acc += term
    np.right_shift(acc, precision, out=acc)
    return np.clip(acc, 0, 255, out=acc)


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames [T, H, W, C] to [T, height, width, C] exactly as
    ``torch.nn.functional.interpolate(x, (height, width), mode="bicubic", antialias=True,
    align_corners=False)`` does for a uint8 CPU tensor (what torchvision's resize runs): width pass
    first, uint8 between passes, a pass skipped when its size is unchanged."""
    return _resize_uint8_aa(frames, height, width, "bicubic")


def resize_bilinear_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Like ``resize_bicubic_aa`` with the tent filter: ``interpolate(mode="bilinear", antialias=True)``
    on a uint8 CPU tensor, which torchvision runs only where torch's CPU capability is "AVX2"."""
    return _resize_uint8_aa(frames, height, width, "bilinear")


def _resize_uint8_aa(frames: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """ATen's separable uint8 antialiased resize (integer weights) of frames [T, H, W, C]."""
    return _per_frame(frames, height, width, np.int32, lambda x, axis, size: _resize_pass(x, axis, size, mode), lambda x: x)


def _per_frame(frames: np.ndarray, height: int, width: int, work: type, one_pass, to_uint8) -> np.ndarray:
    """Frames [T, H, W, C] resized one at a time in `work` precision, width pass first, a pass skipped
    when its size is unchanged (as ATen does); `to_uint8` finishes each frame."""
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"expected uint8 frames [T, H, W, C], got {frames.dtype} {frames.shape}")
    t, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    out = np.empty((t, height, width, c), dtype=np.uint8)
    for i in range(t):  # one frame at a time keeps the working set small
        x = frames[i].transpose(2, 0, 1).astype(work)
        if width != w:
            x = one_pass(x, 2, width)
        if height != h:
            x = one_pass(x, 1, height)
        out[i] = to_uint8(x).transpose(1, 2, 0)
    return out


def _aa_float32_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source start [out], tap count [out] and float32 weights [out, K] of one antialiased bilinear
    pass on a float32 tensor, in ATen's mixed float/double order (``_compute_index_ranges_weights``
    with ``scalar_t = float``: scale, centre, support and weights are floats; C++ promotes the
    ``+ 0.5`` terms and products with ``invscale`` to double before storing back to float)."""
    f32, f64 = np.float32, np.float64
    scale = f32(in_size) / f32(out_size)
    support = f32(f64(scale)) if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0 / f64(scale)) if scale >= 1.0 else f32(1.0)
    taps = int(math.ceil(float(support))) * 2 + 1
    center = (f64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5)).astype(np.float32)
    xmin = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5), 0).astype(np.int64)
    xsize = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, taps)
    j = np.arange(taps)
    pos = (j[None, :] + xmin[:, None]).astype(np.float32) - center[:, None]  # int64 - float: float
    x = ((pos.astype(np.float64) + 0.5) * f64(invscale)).astype(np.float32)
    ax = np.abs(x)
    w = np.where(ax < 1.0, (1.0 - ax.astype(np.float64)).astype(np.float32), f32(0.0))
    w = np.where(j[None, :] < xsize[:, None], w, f32(0.0)).astype(np.float32)
    total = np.zeros(out_size, dtype=np.float32)
    for k in range(taps):  # float accumulation, left to right
        total = (total + w[:, k]).astype(np.float32)
    w = np.where((total != 0)[:, None], w / np.where(total != 0, total, f32(1.0))[:, None], w).astype(np.float32)
    return xmin, xsize, w


def _float_pass(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One bilinear pass over ``axis`` of a float32 [C, H, W] image: ``t0*w0 + t1*w1 + ...`` in float32,
    left to right over each output's own taps (ATen ``interpolate_aa_single_dim``)."""
    xmin, xsize, w = _aa_float32_weights(x.shape[axis], out_size)
    shape = list(x.shape)
    shape[axis] = out_size
    out = np.zeros(shape, dtype=np.float32)
    last = x.shape[axis] - 1
    for k in range(int(xsize.max())):
        active = k < xsize
        src = np.take(x, np.minimum(xmin + k, last), axis=axis)
        wk = np.where(active, w[:, k], np.float32(0.0)).astype(np.float32)
        wk = wk if axis == x.ndim - 1 else wk[:, None]
        term = src * wk
        if k == 0:
            out = term
        else:  # a tap past an output's own count must not add even a -0.0 or rounding: mask, not weight 0
            mask = active if axis == x.ndim - 1 else active[:, None]
            out = np.where(mask, out + term, out)
    return out.astype(np.float32)


def resize_bilinear_aa_float(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames [T, H, W, C] as torchvision does on CPUs whose torch capability is not
    "AVX2" (AVX512 hosts, aarch64): to float32, ``interpolate(mode="bilinear", antialias=True)``
    (width pass first, float32 in between), ``round`` half-to-even, cast to uint8."""
    return _per_frame(frames, height, width, np.float32, _float_pass, lambda x: np.round(x).astype(np.uint8))
