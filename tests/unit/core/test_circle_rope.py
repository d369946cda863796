"""Circle-RoPE: REFERENCE.md s3 — PTD, the ring geometry, hand-computed positions, video, AGE, config errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vltune.core.circle_rope import age_layer_mask, circle_rope_positions, per_token_distance

TEXT_AXIS = np.array([[p, p, p] for p in range(-20, 40)], dtype=np.float64)
A = 10 / math.sqrt(2)  # |R * u| components for R = 10
B = 10 / math.sqrt(6)  # |R * v| / 2 components for R = 10


def cfg(**kw):
    return {"alpha": 0.5, "radius": 10, "method": "circle", "move_to_origin": True, **kw}


# --- PTD -------------------------------------------------------------------------------------------


def test_ptd_paper_hard_layout():
    text = np.array([1, 2, 3, 13, 14])
    image = np.arange(4, 13)
    assert round(per_token_distance(text, image), 2) == 2.22
    assert per_token_distance(text, image) == pytest.approx(100 / 45)  # every text token: 20 / 9 per image


def test_ptd_equidistant_is_zero_and_dims_checked():
    ring = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert per_token_distance(np.zeros((1, 2)), ring) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        per_token_distance(np.zeros((2, 3)), ring)


# --- ring geometry: every image token equidistant from every text position -------------------------


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 3, 5), (1, 1, 1), (1, 2, 7), (1, 2, 2)])
def test_circle_ring_is_equidistant_from_text_axis(grid):
    for alpha, radius, mto, mtp in itertools.product((0, 0.5, 1), (10, "auto", "auto-2"), (True, False), (False, "auto", 3)):
        pos = circle_rope_positions(*grid, cfg(alpha=alpha, radius=radius, move_to_origin=mto, move_to_positive=mtp))
        assert pos.shape == (3, math.prod(grid)) and pos.dtype == np.float64
        ptd = per_token_distance(TEXT_AXIS, pos.T)
        assert ptd < 1e-6, (grid, alpha, radius, mto, mtp, ptd)
        if mtp is False:  # before the shift, the ring lies in the plane orthogonal to (1, 1, 1) through 0
            assert np.abs(pos.sum(axis=0)).max() < 1e-9


@pytest.mark.parametrize("extra", [{"method": "no_circle"}, {"dff_rate": 0.3}, {"dff_rate": 1.0}])
def test_non_circle_layouts_are_not_equidistant(extra):
    pos = circle_rope_positions(1, 4, 4, cfg(**extra))
    assert per_token_distance(TEXT_AXIS, pos.T) > 1e-3
    assert np.abs(pos.sum(axis=0)).max() < 1e-9  # still in the plane, just not on a circle


# --- hand-computed values -----------------------------------------------------------------------------
# P = X*u + Y*v, u = (-1,1,0)/sqrt2, v = (-1,-1,2)/sqrt6, rows (T, H, W) = (P_z, P_y, P_x).
#   (X, Y) = (10, 0)        -> P = (-A, A, 0)
#   (X, Y) = (0, 10)        -> P = (-B, -B, 2B)
#   (X, Y) = (-5, 5*sqrt3)  -> P = (0, -A, A)
#   (X, Y) = (-5, -5*sqrt3) -> P = (A, 0, -A)


def test_hand_grid_1x2x2_alpha0():
    # theta_GA = k/4 * 2pi = 0, pi/2, pi, 3pi/2 -> (10,0), (0,10), (-10,0), (0,-10)
    pos = circle_rope_positions(1, 2, 2, cfg(alpha=0))
    expected = np.array([
        [0, 2 * B, 0, -2 * B],  # T = P_z
        [A, -B, -A, B],  # H = P_y
        [-A, -B, A, B],  # W = P_x
    ])
    np.testing.assert_allclose(pos, expected, atol=1e-12)


def test_hand_grid_1x2x2_alpha1():
    # centred (x, y): (-.5,-.5), (.5,-.5), (-.5,.5), (.5,.5); atan2 = -3pi/4, -pi/4, 3pi/4, pi/4;
    # stretched from [-3pi/4, 3pi/4] onto [0, 2pi]: 0, 2pi/3, 2pi, 4pi/3 (token 0 and 2 coincide: reference quirk)
    pos = circle_rope_positions(1, 2, 2, cfg(alpha=1))
    expected = np.array([
        [0, A, 0, -A],
        [A, -A, A, 0],
        [-A, 0, -A, A],
    ])
    np.testing.assert_allclose(pos, expected, atol=1e-12)
    shifted = circle_rope_positions(1, 2, 2, cfg(alpha=1, move_to_positive="auto"))
    np.testing.assert_allclose(shifted, expected + A, atol=1e-12)


def test_hand_grid_1x1x2_alpha0_and_no_circle():
    # theta_GA = 0, pi -> (10, 0), (-10, 0)
    pos = circle_rope_positions(1, 1, 2, cfg(alpha=0))
    np.testing.assert_allclose(pos, [[0, 0], [A, -A], [-A, A]], atol=1e-12)
    # no_circle: the centred grid (x, y) = (-.5, 0), (.5, 0) itself, projected: x*u
    grid = circle_rope_positions(1, 1, 2, cfg(method="no_circle"))
    a = 0.5 / math.sqrt(2)
    np.testing.assert_allclose(grid, [[0, 0], [-a, a], [a, -a]], atol=1e-12)
    # dff_rate 0.25 blends them linearly
    mixed = circle_rope_positions(1, 1, 2, cfg(alpha=0, dff_rate=0.25))
    np.testing.assert_allclose(mixed, 0.75 * pos + 0.25 * grid, atol=1e-12)


def test_hand_uncentred_alpha1():
    # move_to_origin false, grid (1,1,2): (x, y) = (0, 0), (1, 0) -> atan2 = 0, 0: range 0, left raw -> both theta 0
    pos = circle_rope_positions(1, 1, 2, cfg(alpha=1, move_to_origin=False))
    np.testing.assert_allclose(pos, [[0, 0], [A, A], [-A, -A]], atol=1e-12)


# --- radius rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, mto, auto_r",
    [((1, 3, 5), True, 2.0), ((1, 4, 4), True, 1.5), ((1, 3, 5), False, 4.0), ((1, 6, 2), False, 5.0), ((1, 1, 1), True, 0.0)],
)
@pytest.mark.parametrize("radius, k", [("auto", 1.0), ("auto-2", 2.0), ("auto-0.5", 0.5), (7, None)])
def test_radius(grid, mto, auto_r, radius, k):
    pos = circle_rope_positions(*grid, cfg(radius=radius, move_to_origin=mto))
    expected = 7.0 if k is None else k * auto_r
    np.testing.assert_allclose(np.linalg.norm(pos, axis=0), expected, atol=1e-12)


# --- move_to_positive ------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 3, 5), (1, 2, 7)])
@pytest.mark.parametrize("extra", [{}, {"method": "no_circle"}, {"dff_rate": 0.5}, {"move_to_origin": False}])
def test_move_to_positive(grid, extra):
    base = circle_rope_positions(*grid, cfg(**extra))
    auto = circle_rope_positions(*grid, cfg(move_to_positive="auto", **extra))
    three = circle_rope_positions(*grid, cfg(move_to_positive=3, **extra))
    assert auto.min() == 0.0
    assert three.min() == 3.0
    shift = auto - base  # a shift along (1, 1, 1): the same amount on every coordinate
    np.testing.assert_allclose(shift, -base.min(), atol=1e-12)


# --- video ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride, extra", [(None, {}), (2.5, {}), (4, {"move_to_positive": "auto", "radius": "auto"})])
def test_video_frames_are_shifted_rings(stride, extra):
    c = cfg(**extra) if stride is None else cfg(temporal_stride=stride, **extra)
    step = 1.0 if stride is None else stride
    frame0 = circle_rope_positions(1, 3, 4, c)
    video = circle_rope_positions(3, 3, 4, c)
    assert video.shape == (3, 36)
    for ti in range(3):
        np.testing.assert_allclose(video[:, ti * 12 : (ti + 1) * 12], frame0 + ti * step, atol=1e-12)
        assert per_token_distance(TEXT_AXIS, video[:, ti * 12 : (ti + 1) * 12].T) < 1e-6


# --- AGE -----------------------------------------------------------------------------------------


def test_age_layer_mask():
    assert age_layer_mask("strategy_1", 36) == [True] * 36
    assert age_layer_mask("strategy_2", 36) == [True] * 18 + [False] * 18
    assert age_layer_mask("strategy_3", 36) == [False] * 18 + [True] * 18
    assert age_layer_mask("strategy_4", 36) == [True, False] * 18
    assert age_layer_mask("strategy_1", 5) == [True] * 5
    assert age_layer_mask("strategy_2", 5) == [True, True, True, False, False]
    assert age_layer_mask("strategy_3", 5) == [False, False, False, True, True]
    assert age_layer_mask("strategy_4", 5) == [True, False, True, False, True]
    assert [age_layer_mask(f"strategy_{i}", 1) for i in range(1, 5)] == [[True], [True], [False], [True]]
    with pytest.raises(ValueError, match="strategy_4"):
        age_layer_mask("strategy_5", 36)


# --- config validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("alpha", 1.5),
        ("alpha", "half"),
        ("radius", "autox"),
        ("radius", "auto-"),
        ("radius", -1),
        ("radius", True),
        ("method", "sphere"),
        ("move_to_origin", "yes"),
        ("move_to_positive", "always"),
        ("move_to_positive", True),
        ("dff_rate", 2),
        ("AGE_mode", "strategy_9"),
        ("temporal_stride", 0),
        ("radiuss", 10),
    ],
)
def test_bad_config_raises(key, value):
    with pytest.raises(ValueError, match=key) as info:
        circle_rope_positions(1, 2, 2, cfg(**{key: value}))
    assert repr(value) in str(info.value)


def test_defaults_and_bad_grid():
    np.testing.assert_allclose(circle_rope_positions(1, 2, 3, {}), circle_rope_positions(1, 2, 3, cfg()))
    with pytest.raises(ValueError, match="h"):
        circle_rope_positions(1, 0, 3, {})
