"""The non-deep baselines: a flow-orientation histogram sees which way things move; frame differences do not."""

from __future__ import annotations

import numpy as np
import pytest

from videos import write_frames
from vtransfer.evaluation.motion_baseline import (
    fit_and_score,
    fit_and_score_clips,
    flow_histogram_clip_features,
    flow_histogram_features,
    motion_features,
)

SIZE, SQUARE, FRAMES = 64, 16, 16


def _square_video(path, direction: int, seed: int):
    """A bright noisy square crossing a dark noisy background, left to right (+1), or the same path backwards (-1)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 90, (SIZE, SIZE), dtype=np.uint8)
    square = rng.integers(150, 255, (SQUARE, SQUARE), dtype=np.uint8)
    y, speed = int(rng.integers(4, SIZE - SQUARE - 4)), int(rng.integers(1, 3))
    frames = []
    for t in range(FRAMES):
        x = 4 + speed * (t if direction > 0 else FRAMES - 1 - t)  # the same positions, in the other order
        img = background.copy()
        img[y:y + SQUARE, x:x + SQUARE] = square
        frames.append(np.repeat(img[..., None], 3, axis=-1))
    return write_frames(path, np.stack(frames))


@pytest.fixture(scope="module")
def direction_task(tmp_path_factory):
    """Ten videos a class that differ only by the direction of motion: each right-mover has a left-moving twin."""
    root = tmp_path_factory.mktemp("direction")
    videos = []
    for i in range(10):
        for label, direction in (("right", 1), ("left", -1)):
            videos.append((_square_video(root / f"{label}_{i}.mp4", direction, seed=i), label))
    return videos[:12], videos[12:]


def test_flow_histogram_tells_the_direction_of_motion_apart(direction_task):
    train, test = direction_task
    result = fit_and_score(train, test, features=flow_histogram_features)
    assert result.accuracy >= 0.9, result


def test_frame_differences_cannot_tell_the_direction(direction_task):
    train, test = direction_task
    # the same squares crossing the other way leave the same difference energy
    assert fit_and_score(train, test, features=motion_features).accuracy <= 0.75


def test_flow_histogram_is_a_normalised_grid_of_orientations(direction_task):
    (path, _), *_ = direction_task[0]
    hist = flow_histogram_features(path)
    assert hist.shape == (4 * 4 * 8,) and hist.min() >= 0 and hist.sum() == pytest.approx(1.0, abs=1e-4)


def test_flow_histogram_per_clip_has_a_normalised_row_per_clip(direction_task):
    (path, _), *_ = direction_task[0]
    rows = flow_histogram_clip_features(path, frames=4, stride=2, clips=3)  # 16 frames: flows 0-2, 2-4, ... 12-14
    assert rows.shape == (3, 4 * 4 * 8) and rows.min() >= 0
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-4)
    # clips spread over the video: the first and the last see different stretches of the square's path
    assert not np.allclose(rows[0], rows[-1])
    # a clip longer than the video takes all of its flows, once
    whole = flow_histogram_clip_features(path, frames=40, stride=2, clips=5)
    assert whole.shape == (1, 4 * 4 * 8)
    np.testing.assert_allclose(whole[0], flow_histogram_features(path, step=2), atol=1e-6)


def test_flow_histogram_per_clip_tells_the_direction_from_one_clip_at_a_time(direction_task):
    train, test = direction_task
    result = fit_and_score_clips(train, test, features=lambda p: flow_histogram_clip_features(p, frames=4, stride=2))
    assert result.accuracy >= 0.9, result
    assert sorted(set(result.predictions)) == ["left", "right"]
