"""Circle-RoPE position ids and AGE layer selection, in numpy for both backends.

Circle-RoPE ("Cone-like Decoupled Rotary Positional Embedding for LVLMs") wants every text token to be
equally far from every image token, so that no image token is favoured just because it sits next to the
text in the flattened sequence. Text positions lie on the line (p, p, p); putting an image's tokens on a
circle in a plane orthogonal to (1, 1, 1), centred on that line, makes the distance from any text position
to every image token the same (per-token distance, PTD, = 0).

`circle_rope_positions` returns one grid's positions relative to offset 0; `rope2d.get_rope_index` adds
`text_len + s` exactly as for M-RoPE ids. Positions are float64.

Video: the reference code maps only frame 0 and breaks for t > 1. vltune repeats frame 0's ring for every
frame and adds `t_index * temporal_stride` to all three channels, i.e. moves frame `t_index` along the
text axis. Each frame is then its own circle around the text axis, so PTD stays 0 for every frame, and
frames keep their order. `temporal_stride` (config key, default 1.0) is the axis step per frame, the
same one-id-per-frame-group step as Qwen2-VL's M-RoPE. Frames never coincide for any stride > 0: their
rings lie in distinct parallel planes. The ring's radius and angles come from the (h, w) grid alone; the
time axis plays no part in them (the reference drops z in the projection anyway).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

AGE_MODES = ("strategy_1", "strategy_2", "strategy_3", "strategy_4")
METHODS = ("circle", "no_circle")
DEFAULTS: dict[str, Any] = {
    "alpha": 0.5,
    "radius": 10,
    "method": "circle",
    "move_to_origin": True,
    "move_to_positive": False,
    "dff_rate": None,
    "AGE_mode": None,
    "temporal_stride": 1.0,
}

# Orthonormal basis of the plane orthogonal to the text direction n = (1, 1, 1)/sqrt(3):
# u = (-n_y, n_x, 0) normalised, v = n x u. P = x*u + y*v keeps distances (the map is an isometry).
_U = np.array([-1.0, 1.0, 0.0]) / math.sqrt(2.0)
_V = np.array([-1.0, -1.0, 2.0]) / math.sqrt(6.0)


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"circle_rope: key {key!r} has value {value!r}; allowed: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _radius_scale(value: Any) -> float | None:
    """None for a fixed radius, else k of "auto" (k=1) / "auto-k"."""
    allowed = 'a number > 0, "auto", or "auto-k" with k > 0 (e.g. "auto-2")'
    if _is_number(value):
        if not (math.isfinite(value) and value > 0):
            raise _bad("radius", value, allowed)
        return None
    if value == "auto":
        return 1.0
    if isinstance(value, str) and value.startswith("auto-"):
        try:
            k = float(value[len("auto-"):])
        except ValueError:
            raise _bad("radius", value, allowed) from None
        if math.isfinite(k) and k > 0:
            return k
    raise _bad("radius", value, allowed)


def resolve_config(config: dict | None) -> dict[str, Any]:
    """Validate a recipe's `circle_rope` dict and fill in defaults.

    Raises ValueError naming the key, the value and what is allowed, so a typo in a recipe fails at
    start-up rather than silently training with default positions. As in the reference code, falsy
    `move_to_positive` (false, 0, None) and `dff_rate` (None, false, 0) mean "off".
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise _bad(unknown[0], config[unknown[0]], f"a known key, one of {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}

    if not (_is_number(cfg["alpha"]) and 0.0 <= cfg["alpha"] <= 1.0):
        raise _bad("alpha", cfg["alpha"], "a number in [0, 1]")
    _radius_scale(cfg["radius"])
    if cfg["method"] not in METHODS:
        raise _bad("method", cfg["method"], f"one of {METHODS}")
    if not isinstance(cfg["move_to_origin"], (bool, np.bool_)):
        raise _bad("move_to_origin", cfg["move_to_origin"], "true or false")
    mtp = cfg["move_to_positive"]
    if not (mtp is None or mtp is False or mtp == "auto" or (_is_number(mtp) and math.isfinite(mtp))):
        raise _bad("move_to_positive", mtp, 'false, "auto", or a finite number (the offset)')
    dff = cfg["dff_rate"]
    if not (dff is None or dff is False or (_is_number(dff) and 0.0 <= dff <= 1.0)):
        raise _bad("dff_rate", dff, "null or a number in [0, 1]")
    if cfg["AGE_mode"] is not None and cfg["AGE_mode"] not in AGE_MODES:
        raise _bad("AGE_mode", cfg["AGE_mode"], f"null or one of {AGE_MODES}")
    stride = cfg["temporal_stride"]
    if not (_is_number(stride) and math.isfinite(stride) and stride > 0):
        raise _bad("temporal_stride", stride, "a number > 0")
    return cfg


def _frame_ring(h: int, w: int, cfg: dict[str, Any]) -> np.ndarray:
    """[3, h*w] positions (P_x, P_y, P_z) of one frame, row-major, REFERENCE s3 steps 1-6."""
    # Step 1: x = column (w) index, y = row (h) index; z (= 0 for one frame) is dropped by step 4.
    y, x = (a.ravel().astype(np.float64) for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    z = np.zeros_like(x)
    if cfg["move_to_origin"]:
        x = x - (x.max() + x.min()) / 2.0
        y = y - (y.max() + y.min()) / 2.0
        z = z - (z.max() + z.min()) / 2.0

    # Step 2: radius. "auto" uses the largest |coordinate| of any axis, as the reference code does
    # (the paper's max ||(x, y)|| would be larger); "auto-k" scales it by k.
    scale = _radius_scale(cfg["radius"])
    radius = float(cfg["radius"]) if scale is None else scale * float(np.abs(np.stack([x, y, z])).max())

    # Step 3: the planar points. theta_SA keeps the image's spatial arrangement (angle around its centre,
    # stretched onto a full turn); theta_GA spaces tokens evenly in reading order; alpha blends them.
    def planar(method: str) -> tuple[np.ndarray, np.ndarray]:
        if method == "no_circle":
            return x, y
        theta_sa = np.arctan2(y, x)
        lo, hi = theta_sa.min(), theta_sa.max()
        if hi - lo > 0:
            theta_sa = (theta_sa - lo) / (hi - lo) * (2.0 * math.pi)
        theta_ga = np.arange(h * w, dtype=np.float64) / (h * w) * (2.0 * math.pi)
        theta = cfg["alpha"] * theta_sa + (1.0 - cfg["alpha"]) * theta_ga
        return radius * np.cos(theta), radius * np.sin(theta)

    # Step 4: into the plane orthogonal to (1, 1, 1), so that every point is as far from each text
    # position (p, p, p) as every other point of the same circle.
    def project(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        return np.outer(_U, px) + np.outer(_V, py)

    pos = project(*planar(cfg["method"]))
    # Step 5: dff_rate blends the ring with the projected grid (trades equidistance for locality).
    if cfg["dff_rate"]:
        d = float(cfg["dff_rate"])
        pos = (1.0 - d) * pos + d * project(*planar("no_circle"))
    # Step 6: shift along (1, 1, 1) (stays on the text axis) so the smallest coordinate is the offset.
    mtp = cfg["move_to_positive"]
    if mtp:
        offset = 0.0 if mtp == "auto" else float(mtp)
        pos = pos + abs(pos.min()) + offset
    return pos


def circle_rope_positions(t: int, h: int, w: int, config: dict) -> np.ndarray:
    """Circle-RoPE positions of one merged grid: float64 [3, t*h*w], rows (T, H, W), relative to 0.

    `h`, `w` are LLM-token rows/cols (already divided by the spatial merge size); tokens are in
    (t, h, w) order as in the sequence. Rows are (T, H, W) = (P_z, P_y, P_x) of the 3-D point P, which is
    the reference's output order. Frame `i` of a video is frame 0's ring plus `i * temporal_stride` on all
    three rows (see the module docstring).
    """
    for name, n in (("t", t), ("h", h), ("w", w)):
        if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"circle_rope_positions: {name} must be an integer >= 1, got {n!r}")
    cfg = resolve_config(config)
    ring = _frame_ring(int(h), int(w), cfg)[::-1]  # (P_x, P_y, P_z) -> (T, H, W) = (P_z, P_y, P_x)
    shifts = np.repeat(np.arange(t, dtype=np.float64) * float(cfg["temporal_stride"]), h * w)
    return np.ascontiguousarray(np.tile(ring, (1, t)) + shifts)


def age_layer_mask(age_mode: str, num_layers: int) -> list[bool]:
    """Which decoder layers use Circle-RoPE (True) vs plain M-RoPE (False) under AGE.

    strategy_1: all layers. strategy_2: the first half. strategy_3: the second half. strategy_4: even
    layers (0-based). Halves split at ceil(num_layers / 2): for an odd count the middle layer belongs to
    the first half, so strategy_2 and strategy_3 are exact complements and a 1-layer model under strategy_2
    still gets one Circle-RoPE layer. (The reference hard-codes 36 layers, where both rules agree.)
    """
    if age_mode not in AGE_MODES:
        raise ValueError(f"age_layer_mask: AGE_mode {age_mode!r} is not one of {AGE_MODES}")
    if not (isinstance(num_layers, (int, np.integer)) and not isinstance(num_layers, bool) and num_layers >= 0):
        raise ValueError(f"age_layer_mask: num_layers must be an integer >= 0, got {num_layers!r}")
    half = (num_layers + 1) // 2
    rule = {
        "strategy_1": lambda i: True,
        "strategy_2": lambda i: i < half,
        "strategy_3": lambda i: i >= half,
        "strategy_4": lambda i: i % 2 == 0,
    }[age_mode]
    return [rule(i) for i in range(num_layers)]


def per_token_distance(text_positions: np.ndarray, image_positions: np.ndarray) -> float:
    """PTD = 1/(N_img*N_txt) * sum_t sum_i |d(t,i) - mean_i d(t,i)|, d = Euclidean distance.

    0 means every text token sees all image tokens at one distance (no positional favouritism). Inputs are
    [N, D] arrays of position vectors; 1-D arrays are read as D = 1.
    """
    txt = np.asarray(text_positions, dtype=np.float64)
    img = np.asarray(image_positions, dtype=np.float64)
    txt = txt[:, None] if txt.ndim == 1 else txt
    img = img[:, None] if img.ndim == 1 else img
    if txt.ndim != 2 or img.ndim != 2 or txt.shape[1] != img.shape[1]:
        raise ValueError(f"per_token_distance: need [N_txt, D] and [N_img, D], got {txt.shape} and {img.shape}")
    if len(txt) == 0 or len(img) == 0:
        raise ValueError("per_token_distance: need at least one text and one image position")
    d = np.linalg.norm(txt[:, None, :] - img[None, :, :], axis=-1)  # [N_txt, N_img]
    return float(np.abs(d - d.mean(axis=1, keepdims=True)).mean())
