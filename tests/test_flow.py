"""Tests for vtransfer.data.flow: optical flow on synthetic videos of known motion, quantisation, errors.

The videos are a smooth random texture (the background, static) with a
brighter textured square pasted on it that moves by a known ``(dx, dy)`` pixels
per frame, 64 x 64 px. Every flow method must find that motion inside the
square and (nearly) none on the background away from the square's edges.
Tests that compute flow skip when OpenCV is not installed.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from vtransfer.data import flow as flowmod
from vtransfer.data.flow import (
    FLOW_METHODS,
    OPENCV_PACKAGE,
    FlowSettings,
    compute_flow,
    dequantise,
    flow_pairs,
    import_cv2,
    iter_flow,
    quantise,
)
from vtransfer.utils.errors import ConfigError, DatasetError

SIZE = 64  # frame side, px
SQUARE = 24  # moving square side, px
BOUND = 8.0  # small bound: a quantisation step of 8/127 = 0.063 px
# Measured on these videos (OpenCV 5.1): the median flow inside the square is within 0.06 px of the true
# motion for DIS-ultrafast/fast, Farneback and TV-L1; DIS-medium under-estimates by up to 12% on frames
# this small (2.65 for 3 px; 1.83 for 2). The tolerance is relative: 15% of the motion + 0.1 px per
# component. The background's mean |flow| is at most 0.14 px (Farneback smears edges most).
INSIDE_REL_TOL, INSIDE_ABS_TOL = 0.15, 0.1
INSIDE_MEDIAN_TOL = 0.35  # for single values (magnitude, the reversed-video check)
INSIDE_MEAN_TOL = 0.35
OUTSIDE_MEAN_TOL = 0.25
MARGIN = 4  # px ignored inside the square's edges
HALO = 7  # px ignored around the square's path


def _smooth_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random texture in [0, 1] blurred with a 5-tap binomial filter twice (flow methods need gradients)."""
    t = rng.random((h + 8, w + 8))
    k = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16
    for _ in range(2):
        t = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 0, t)
        t = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, t)
    t = t[4:-4, 4:-4]
    return (t - t.min()) / (t.max() - t.min())


def translating_square(dx: int, dy: int, frames: int = 3, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``frames x 64 x 64 x 3`` uint8 video and the square's top-left corner ``(x, y)`` in each frame."""
    rng = np.random.default_rng(seed)
    background = _smooth_texture(rng, SIZE, SIZE) * 0.5
    square = _smooth_texture(rng, SQUARE, SQUARE) * 0.5 + 0.5
    x0 = (SIZE - SQUARE) // 2 - dx * (frames // 2)
    y0 = (SIZE - SQUARE) // 2 - dy * (frames // 2)
    video, corners = [], []
    for t in range(frames):
        x, y = x0 + dx * t, y0 + dy * t
        f = background.copy()
        f[y : y + SQUARE, x : x + SQUARE] = square
        video.append(np.repeat((f * 255).astype(np.uint8)[..., None], 3, axis=-1))
        corners.append((x, y))
    return np.stack(video), corners


@pytest.fixture
def cv2():
    """OpenCV with one thread (restored after), or a skip."""
    cv2 = pytest.importorskip("cv2")
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield cv2
    cv2.setNumThreads(before)


# -- flow of known motion ----------------------------------------------------------------------


@pytest.mark.parametrize("method", list(FLOW_METHODS))
@pytest.mark.parametrize("dx,dy", [(2, -1), (-1, 3)])
def test_translating_square_gives_its_motion_inside_and_none_outside(cv2, method, dx, dy):
    video, corners = translating_square(dx, dy)
    settings = FlowSettings(method, bound=BOUND, channels=3)
    q = compute_flow(video, settings)
    assert q.dtype == np.uint8 and q.shape == (len(video) - 1, 3, SIZE, SIZE)
    px = dequantise(q, BOUND, unit="px").numpy()
    for k, (x, y) in enumerate(corners[:-1]):
        inside = px[k, :2, y + MARGIN : y + SQUARE - MARGIN, x + MARGIN : x + SQUARE - MARGIN].reshape(2, -1)
        truth = np.array([[dx], [dy]], dtype=np.float32)
        median = np.median(inside, axis=1)
        tolerance = INSIDE_REL_TOL * np.abs(truth[:, 0]) + INSIDE_ABS_TOL
        assert (np.abs(median - truth[:, 0]) <= tolerance).all(), (method, k, median)
        assert np.abs(inside - truth).mean() < INSIDE_MEAN_TOL, (method, k)
        magnitude = px[k, 2, y + MARGIN : y + SQUARE - MARGIN, x + MARGIN : x + SQUARE - MARGIN]
        speed = np.hypot(dx, dy)
        assert abs(np.median(magnitude) - speed) <= INSIDE_REL_TOL * speed + INSIDE_ABS_TOL, (method, k)
        background = np.ones((SIZE, SIZE), dtype=bool)
        x1, y1 = corners[k + 1]
        top, bottom = min(y, y1) - HALO, max(y, y1) + SQUARE + HALO
        background[top:bottom, min(x, x1) - HALO : max(x, x1) + SQUARE + HALO] = False
        assert background.sum() > 300
        assert np.abs(px[k, :2][:, background]).mean() < OUTSIDE_MEAN_TOL, (method, k)


def _median_inside(flow: torch.Tensor, corner: tuple[int, int]) -> torch.Tensor:
    """Median (x, y) of a ``2 x H x W`` flow over the square with top-left ``corner``, minus the margin."""
    x, y = corner
    return flow[:2, y + MARGIN : y + SQUARE - MARGIN, x + MARGIN : x + SQUARE - MARGIN].reshape(2, -1).median(dim=1).values


def test_reversed_video_gives_opposite_flow(cv2):
    video, corners = translating_square(2, -1)
    settings = FlowSettings("dis-fast", bound=BOUND)
    forward = dequantise(compute_flow(video, settings), BOUND, unit="px")
    backward = dequantise(compute_flow(video[::-1].copy(), settings), BOUND, unit="px")
    # forward pair 1 is frame 1 -> 2; backward pair 0 is frame 2 -> 1, starting where the square is in frame 2
    assert torch.allclose(_median_inside(forward[1], corners[1]), torch.tensor([2.0, -1.0]), atol=INSIDE_MEDIAN_TOL)
    assert torch.allclose(_median_inside(backward[0], corners[2]), torch.tensor([-2.0, 1.0]), atol=INSIDE_MEDIAN_TOL)


def test_read_video_layout_indices_pairing_and_progress(cv2):
    video, _ = translating_square(1, 1, frames=5)
    tchw = torch.from_numpy(video).permute(0, 3, 1, 2)  # read_video's T x 3 x H x W with channels-last strides
    every = compute_flow(video, FlowSettings("dis-fast", bound=BOUND))
    assert np.array_equal(compute_flow(tchw, FlowSettings("dis-fast", bound=BOUND)), every)
    calls = []
    sampled = compute_flow(
        video, FlowSettings("dis-fast", bound=BOUND), indices=[0, 2, 4], progress=lambda d, n: calls.append((d, n))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(sampled[:2], every[[0, 2]])  # (0, 1), (2, 3)
    assert np.array_equal(sampled[2], every[3])  # the last frame has no successor: (3, 4)
    over_two = compute_flow(video, FlowSettings("dis-fast", bound=BOUND, pairing="next-sampled"), indices=[0, 2, 4])
    assert over_two.shape[0] == 2
    assert np.array_equal(over_two, compute_flow(video, FlowSettings("dis-fast", bound=BOUND), pairs=[(0, 2), (2, 4)]))
    raw = list(iter_flow(video, FlowSettings("dis-fast", bound=BOUND), pairs=[(0, 1)], raw=True))
    assert raw[0].dtype == np.float32 and raw[0].shape == (SIZE, SIZE, 2)
    assert np.array_equal(quantise(raw[0], BOUND, 2), every[0])


def test_flow_pairs():
    assert flow_pairs(4) == [(0, 1), (1, 2), (2, 3)]
    assert flow_pairs(4, pairing="next-sampled") == [(0, 1), (1, 2), (2, 3)]
    assert flow_pairs(10, [0, 4, 9], "next-frame") == [(0, 1), (4, 5), (8, 9)]
    assert flow_pairs(10, [0, 4, 8], "next-sampled") == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="outside"):
        flow_pairs(10, [10])
    with pytest.raises(ConfigError, match="pairing"):
        flow_pairs(10, [1], "previous")


# -- quantisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [1.0, 8.0, 20.0])
def test_quantisation_round_trip_is_within_half_a_step(bound):
    rng = np.random.default_rng(1)
    flow = rng.uniform(-0.7 * bound, 0.7 * bound, size=(16, 16, 2)).astype(np.float32)
    flow[0, 0] = 0.0
    q = quantise(flow, bound, channels=3)
    assert q.dtype == np.uint8 and q.shape == (3, 16, 16)
    assert q[0, 0, 0] == q[1, 0, 0] == 128 and q[2, 0, 0] == 0
    back = dequantise(q, bound, unit="px").numpy()
    step = bound / 127
    assert np.abs(back[:2] - flow.transpose(2, 0, 1)).max() <= step / 2 + 1e-5
    assert np.abs(back[2] - np.hypot(flow[..., 0], flow[..., 1])).max() <= bound / 510 + 1e-5
    assert back[0, 0, 0] == 0.0 and back[1, 0, 0] == 0.0
    unit = dequantise(torch.from_numpy(q)[None], bound)  # leading dims kept; x, y in [-1, 1]
    assert unit.shape == (1, 3, 16, 16) and unit.dtype == torch.float32
    assert torch.allclose(unit[0] * bound, torch.from_numpy(back))


def test_quantisation_clips_at_the_bound():
    flow = np.array([[[50.0, -50.0], [8.0, -8.0], [7.9, 0.0], [-1e6, 3.0]]], dtype=np.float32)  # 1 x 4 x 2
    q = quantise(flow, 8.0, channels=3)
    assert q[0, 0].tolist() == [255, 255, 128 + 125, 1]  # 7.9 px: 125 steps of 8/127
    assert q[1, 0].tolist() == [1, 1, 128, 128 + round(3 * 127 / 8)]
    assert q[2, 0].tolist() == [255, 255, round(7.9 * 255 / 8), 255]  # magnitude clipped to the bound too
    px = dequantise(q, 8.0, unit="px")
    assert px[0, 0].tolist() == pytest.approx([8.0, 8.0, 125 * 8 / 127, -8.0], abs=1e-6)
    assert px[2, 0, 0].item() == 8.0
    assert dequantise(q, 8.0)[:2].abs().max().item() == 1.0


def test_dequantise_rejects_what_is_not_quantised_flow():
    with pytest.raises(ValueError, match="uint8"):
        dequantise(np.zeros((2, 4, 4), dtype=np.float32), 8.0)
    with pytest.raises(ValueError, match="C = 2 or 3"):
        dequantise(np.zeros((4, 4, 4), dtype=np.uint8), 8.0)


# -- settings and errors -----------------------------------------------------------------------------


def test_settings_validate_and_key_tells_them_apart():
    keys = {
        FlowSettings(m, b, c, p).key()
        for m in FLOW_METHODS
        for b in (8, 20.0, 20.5)
        for c in (2, 3)
        for p in ("next-frame", "next-sampled")
    }
    assert len(keys) == len(FLOW_METHODS) * 3 * 2 * 2
    assert FlowSettings().key() == "flow-dis-medium-b20-c2-next-frame"
    assert FlowSettings(bound=8).bound == 8.0
    bad_settings = (
        {"method": "raft"}, {"bound": 0}, {"bound": float("nan")}, {"bound": "x"}, {"channels": 1}, {"pairing": "prev"}
    )
    for bad in bad_settings:
        with pytest.raises(ConfigError):
            FlowSettings(**bad)


def test_fewer_than_two_frames_names_the_file():
    one = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(DatasetError, match=r"clips/short\.mp4: .*at least 2 frames.* has 1"):
        compute_flow(one, FlowSettings(), source="clips/short.mp4")
    with pytest.raises(DatasetError, match="at least 2 frames"):
        next(iter_flow(np.zeros((0, 8, 8, 3), dtype=np.uint8)))
    with pytest.raises(ValueError, match="uint8"):
        compute_flow(np.zeros((3, 8, 8, 3), dtype=np.float32))


def test_missing_opencv_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(ConfigError, match=OPENCV_PACKAGE) as info:
        compute_flow(np.zeros((2, 8, 8, 3), dtype=np.uint8), FlowSettings("dis-fast"))
    assert "pip install opencv-contrib-python-headless" in str(info.value)
    with pytest.raises(ConfigError, match=OPENCV_PACKAGE):
        import_cv2()


def test_opencv_without_contrib_names_the_package_for_tvl1(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # a cv2 without cv2.optflow
    assert import_cv2() is sys.modules["cv2"]
    with pytest.raises(ConfigError, match=f"tvl1.*{OPENCV_PACKAGE}"):
        compute_flow(np.zeros((2, 8, 8, 3), dtype=np.uint8), FlowSettings("tvl1"))
    assert flowmod.OPENCV_PACKAGE == "opencv-contrib-python-headless"
