"""make-demo: real decodable H.264 files, categories, determinism, disjoint sets, and motion that needs time."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.data import demo
from vtransfer.data.demo import (
    APPEARANCE,
    CATALOGUE,
    CLASS_SETS,
    MOTION,
    SOURCE_CLASSES,
    TARGET_CLASSES,
    Canvas,
    make_demo,
    render_video,
)
from vtransfer.utils.errors import ConfigError, DatasetError

vtransfer.cli._register_commands()

# Time-reversal pairs: the second class is the first played backwards.
REVERSAL_PAIRS = [("move_right", "move_left"), ("move_down", "move_up"), ("diagonal_up", "diagonal_down"),
                  ("rotate_cw", "rotate_ccw"), ("grow", "shrink")]


def decode(path: Path) -> np.ndarray:
    """All frames of a file as uint8 T x H x W x 3 (PyAV directly)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_files_decode_to_requested_frames_and_size(tmp_path):
    out = tmp_path / "demo"
    summary = make_demo(out, classes=["ring", "bounce"], videos_per_class=2, frames=10, size=(32, 48), fps=10)
    assert summary.classes == ["ring", "bounce"]
    assert summary.counts == {"ring": 2, "bounce": 2}
    expected = [out / c / f"{c}_{i:03d}.mp4" for c in ("ring", "bounce") for i in range(2)]
    assert summary.files == expected
    assert sorted(out.rglob("*.mp4")) == sorted(expected)
    assert summary.total_bytes == sum(p.stat().st_size for p in expected)
    for path in expected:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert float(stream.average_rate) == 10
        assert decode(path).shape == (10, 32, 48, 3)


def test_categories_csv_and_readme_cover_every_class(tmp_path):
    out = tmp_path / "demo"
    summary = make_demo(out, class_set="target", videos_per_class=1, frames=4, size=16)
    with open(out / "categories.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "category"]
    mapping = dict(rows[1:])
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert sorted(mapping) == folders == sorted(TARGET_CLASSES)
    assert mapping == {c: CATALOGUE[c].category for c in TARGET_CLASSES} == summary.categories
    readme = (out / "README.txt").read_text()
    assert readme.startswith(demo.README_MARKER)
    for name in TARGET_CLASSES:
        assert f"{name}, {CATALOGUE[name].category}:" in readme


def test_same_seed_same_files_other_seed_other_frames(tmp_path):
    kwargs = dict(classes=["cross", "move_up"], videos_per_class=2, frames=8, size=32)
    a = make_demo(tmp_path / "a", seed=7, **kwargs)
    b = make_demo(tmp_path / "b", seed=7, workers=3, **kwargs)  # written in parallel: the same files, in order
    assert [f.name for f in b.files] == [f.name for f in a.files] and b.total_bytes == a.total_bytes
    c = make_demo(tmp_path / "c", seed=8, **kwargs)
    for fa, fb, fc in zip(a.files, b.files, c.files):
        assert fa.read_bytes() == fb.read_bytes()
        assert np.array_equal(decode(fa), decode(fb))
        assert not np.array_equal(decode(fa), decode(fc))
    # A video depends on (seed, class, index) only, not on which other classes are made.
    alone = make_demo(tmp_path / "d", seed=7, classes=["move_up", "ring"], videos_per_class=1, frames=8, size=32)
    assert alone.files[1].read_bytes() == a.files[2].read_bytes()  # move_up_000 in both


def test_source_and_target_are_disjoint_and_mixed():
    assert set(SOURCE_CLASSES).isdisjoint(TARGET_CLASSES)
    assert CLASS_SETS["all"] == tuple(CATALOGUE)
    assert set(SOURCE_CLASSES) | set(TARGET_CLASSES) <= set(CATALOGUE)
    for name in ("source", "target"):
        cats = [CATALOGUE[c].category for c in CLASS_SETS[name]]
        assert cats.count(APPEARANCE) >= 3 and cats.count(MOTION) >= 3, name
    assert [CATALOGUE[c].category for c in TARGET_CLASSES].count(APPEARANCE) == 3
    assert {spec.category for spec in CATALOGUE.values()} == {APPEARANCE, MOTION}
    # Horizontal-flip augmentation must not turn one class into another inside a set.
    flip_sensitive = {"move_left", "move_right", "rotate_cw", "rotate_ccw"}
    assert flip_sensitive.isdisjoint(SOURCE_CLASSES) and flip_sensitive.isdisjoint(TARGET_CLASSES)


def test_motion_classes_share_one_look_and_appearance_classes_one_motion():
    motion = [s for s in CATALOGUE.values() if s.category == MOTION]
    appearance = [s for s in CATALOGUE.values() if s.category == APPEARANCE]
    assert {s.look for s in motion} == {demo._motion_object}
    assert {s.motion for s in appearance} == {demo._nuisance_motion}
    appearance_shapes = {s.look(np.random.default_rng(0), Canvas(8, 64, 64)).shape for s in appearance}
    assert appearance_shapes.isdisjoint(demo.MOTION_OBJECT_SHAPES)


@pytest.mark.parametrize("forward,backward", REVERSAL_PAIRS)
def test_paired_motion_classes_are_time_reversals(forward, backward):
    canvas = Canvas(24, 64, 64)
    a = CATALOGUE[forward].motion(np.random.default_rng(11), canvas)
    b = CATALOGUE[backward].motion(np.random.default_rng(11), canvas)
    for field in ("x", "y", "angle", "scale"):
        assert np.allclose(getattr(a, field)[::-1], getattr(b, field)), field
    assert any(not np.allclose(getattr(a, f), getattr(b, f)) for f in ("x", "y", "angle", "scale"))


@pytest.mark.parametrize("classes", [
    tuple(c for c in TARGET_CLASSES if CATALOGUE[c].category == MOTION),
    tuple(c for c in SOURCE_CLASSES if CATALOGUE[c].category == MOTION),
    ("move_right", "move_left"), ("grow", "shrink"), ("rotate_cw", "rotate_ccw"), ("slow", "fast", "bounce", "orbit"),
])
def test_every_single_frame_has_the_same_distribution_in_motion_classes(classes):
    """Position (on the torus), angle and size at the first, middle and last frame match across classes."""
    canvas = Canvas(24, 64, 64)
    draws = {c: [CATALOGUE[c].motion(np.random.default_rng(1000 * k + i), canvas) for i in range(300)]
             for k, c in enumerate(classes)}
    for t in (0, 12, 23):
        stats = {c: {"x": np.array([p.x[t] % 64 for p in d]), "y": np.array([p.y[t] % 64 for p in d]),
                     "angle": np.array([p.angle[t] % (2 * np.pi) for p in d]),
                     "scale": np.array([p.scale[t] for p in d])} for c, d in draws.items()}
        first = stats[classes[0]]
        for other in classes[1:]:
            for key in first:
                if np.ptp(first[key]) == 0 and np.ptp(stats[other][key]) == 0:
                    assert first[key][0] == stats[other][key][0]
                    continue
                p = ks_2samp(first[key], stats[other][key]).pvalue
                assert p > 1e-3, (classes[0], other, key, t, p)


# ---------------------------------------------------------------------------
# Decoded videos: single frames cannot tell motion classes apart, frame-to-frame change can
# ---------------------------------------------------------------------------


def _object_track(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: circular mean x, y (radians on the torus) of hard edges, and edge-pixel count.

    The object is the only thing with sharp edges (background texture and distractors are soft).
    """
    v = video.astype(np.float32) / 255.0
    gx = np.roll(v, -1, 2) - np.roll(v, 1, 2)
    gy = np.roll(v, -1, 1) - np.roll(v, 1, 1)
    edges = np.sqrt((gx**2 + gy**2).sum(-1)) > 0.35
    t, h, w = edges.shape
    ax = 2 * np.pi * np.arange(w) / w
    ay = 2 * np.pi * np.arange(h) / h
    cols, rows = edges.sum(1), edges.sum(2)
    x = np.arctan2(cols @ np.sin(ax), cols @ np.cos(ax))
    y = np.arctan2(rows @ np.sin(ay), rows @ np.cos(ay))
    return x, y, edges.sum((1, 2)).astype(np.float64) + 1.0


def _single_frame_features(video: np.ndarray, t: int) -> list[float]:
    x, y, count = _object_track(video)
    frame = video[t].astype(np.float32) / 255.0
    return [np.sin(x[t]), np.cos(x[t]), np.sin(y[t]), np.cos(y[t]), np.log(count[t]),
            *frame.mean((0, 1)), *frame.std((0, 1))]


def _frame_shifts(video: np.ndarray, reach: int = 4) -> np.ndarray:
    """Per consecutive frame pair, the (dy, dx) shift that best aligns the hard-edge maps (T-1 x 2)."""
    v = video.astype(np.float32) / 255.0
    gx = np.roll(v, -1, 2) - np.roll(v, 1, 2)
    gy = np.roll(v, -1, 1) - np.roll(v, 1, 1)
    edges = (np.sqrt((gx**2 + gy**2).sum(-1)) > 0.35).astype(np.float32)
    offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    scores = np.stack([(edges[1:] * np.roll(edges[:-1], o, axis=(1, 2))).sum((1, 2)) for o in offsets], 1)
    return np.array(offsets, dtype=np.float64)[scores.argmax(1)]


def _temporal_features(video: np.ndarray) -> list[float]:
    """Direction, speed, back-and-forth and growth of what moves, from consecutive frames."""
    steps = _frame_shifts(video)
    main_axis = np.linalg.svd(steps, full_matrices=False)[2][0]
    along = steps @ main_axis
    reversals = np.mean(np.sign(along[1:]) * np.sign(along[:-1]) < 0)
    _, _, count = _object_track(video)
    dsize = np.diff(np.log(count))
    skew = ((dsize - dsize.mean()) ** 3).mean() / (dsize.std() ** 3 + 1e-9)
    dy, dx = steps[:, 0], steps[:, 1]
    straightness = np.hypot(dy.mean(), dx.mean()) / (np.hypot(dy, dx).mean() + 1e-9)
    return [dy.mean(), dx.mean(), np.abs(dy).mean(), np.abs(dx).mean(), straightness, reversals,
            np.median(dsize), skew]


def _cv_accuracy(features: list[list[float]], labels: list[int]) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(4, shuffle=True, random_state=0)
    return float(cross_val_score(clf, np.array(features), np.array(labels), cv=cv).mean())


@pytest.mark.parametrize("classes,size,frames,per_class,single_max,temporal_min", [
    (("move_up", "move_down", "bounce"), 32, 12, 16, 0.55, 0.85),  # the target set's motion classes
    (("diagonal_up", "diagonal_down", "orbit", "fast"), 48, 16, 12, 0.45, 0.85),  # the source set's
    (("grow", "shrink"), 48, 24, 20, 0.70, 0.80),
])
def test_motion_classes_need_time(tmp_path, classes, size, frames, per_class, single_max, temporal_min):
    summary = make_demo(tmp_path / "m", classes=list(classes), videos_per_class=per_class, frames=frames, size=size)
    videos = [decode(p) for p in summary.files]
    labels = [classes.index(p.parent.name) for p in summary.files]
    first = _cv_accuracy([_single_frame_features(v, 0) for v in videos], labels)
    middle = _cv_accuracy([_single_frame_features(v, frames // 2) for v in videos], labels)
    temporal = _cv_accuracy([_temporal_features(v) for v in videos], labels)
    assert first < single_max and middle < single_max, (first, middle)
    assert temporal > temporal_min, temporal


# ---------------------------------------------------------------------------
# Options, errors and the CLI
# ---------------------------------------------------------------------------


def test_bad_options_raise_config_errors_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match="--size"):
        make_demo(tmp_path / "a", size=33)
    with pytest.raises(ConfigError, match="--classes.*nope"):
        make_demo(tmp_path / "b", classes=["ring", "nope"])
    with pytest.raises(ConfigError, match="--classes.*disc.*target"):
        make_demo(tmp_path / "c", class_set="target", classes=["ring", "disc"])
    with pytest.raises(ConfigError, match="--set"):
        make_demo(tmp_path / "d", class_set="everything")
    with pytest.raises(ConfigError, match="--codec"):
        make_demo(tmp_path / "e", classes=["ring", "cross"], videos_per_class=1, codec="no-such-codec")
    with pytest.raises(ConfigError, match="--workers 0"):
        make_demo(tmp_path / "w", workers=0)
    with pytest.raises(ConfigError, match="--frames"):
        make_demo(tmp_path / "f", frames=2)
    with pytest.raises(ConfigError, match="unknown demo class"):
        render_video("nope", 0)
    assert not any((tmp_path / n).exists() for n in "abcdefw")


def test_refuses_non_empty_folder_and_only_overwrites_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not empty"):
        make_demo(foreign, classes=["ring", "cross"], videos_per_class=1, frames=4, size=16)
    with pytest.raises(DatasetError, match="not a make-demo folder"):
        make_demo(foreign, classes=["ring", "cross"], videos_per_class=1, frames=4, size=16, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"

    out = tmp_path / "demo"
    make_demo(out, classes=["ring", "cross"], videos_per_class=1, frames=4, size=16)
    make_demo(out, classes=["disc", "bounce"], videos_per_class=1, frames=4, size=16, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["bounce", "disc"]


def test_clutter_zero_is_a_plain_still_background():
    plain = render_video("ring", 3, frames=6, height=32, width=32, clutter=0.0)
    busy = render_video("ring", 3, frames=6, height=32, width=32)
    assert plain.shape == busy.shape == (6, 32, 32, 3)
    # Without clutter the most common colour (the background) covers most of every frame.
    flat = plain.reshape(6, -1, 3)
    for frame in flat:
        _, counts = np.unique(frame, axis=0, return_counts=True)
        assert counts.max() > 0.4 * frame.shape[0]
    assert np.abs(plain.astype(int) - busy).mean() > 5


def test_cli_writes_dataset_and_prints_table(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    result = runner.invoke(app, ["make-demo", str(out), "--set", "target", "--classes", "ring,bounce",
                                 "--videos-per-class", "2", "--frames", "6", "--size", "48x32", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "ring" in result.output and "appearance" in result.output and "motion" in result.output
    assert "4 videos" in result.output
    assert decode(out / "bounce" / "bounce_001.mp4").shape == (6, 32, 48, 3)

    again = runner.invoke(app, ["make-demo", str(out), "--classes", "ring,bounce", "-n", "1"])
    assert again.exit_code == 2
    assert "not empty" in again.output

    as_json = runner.invoke(app, ["make-demo", str(out), "--overwrite", "--json", "--classes", "ring,cross,bounce",
                                  "-n", "1", "--frames", "4", "--size", "16"])
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.output)
    assert info["classes"] == ["ring", "cross", "bounce"] and info["videos"] == 3
    assert info["categories"]["bounce"] == "motion" and info["height"] == info["width"] == 16

    bad = runner.invoke(app, ["make-demo", str(tmp_path / "x"), "--classes", "ring,wobble"])
    assert bad.exit_code == 2 and "wobble" in bad.output

    listing = runner.invoke(app, ["make-demo", "--list-classes", "--json"])
    assert listing.exit_code == 0 and json.loads(listing.output) == {c: s.category for c, s in CATALOGUE.items()}


def _keyframes(path: Path) -> list[int]:
    """Indices of the keyframe packets of a file's video stream."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    return [i for i, p in enumerate(packets) if p.is_keyframe]


def test_keyframe_interval_default_is_one_second_and_can_be_set(tmp_path):
    one_second = make_demo(tmp_path / "a", classes=["ring", "bounce"], videos_per_class=1, frames=20, size=32, fps=10)
    assert _keyframes(one_second.files[0]) == [0, 10]
    every_five = make_demo(tmp_path / "b", classes=["ring", "bounce"], videos_per_class=1, frames=20, size=32, fps=10,
                           keyframe_interval=5)
    assert _keyframes(every_five.files[0]) == [0, 5, 10, 15]
    one_keyframe = make_demo(tmp_path / "c", classes=["ring", "bounce"], videos_per_class=1, frames=20, size=32, fps=10,
                             keyframe_interval=250)
    assert _keyframes(one_keyframe.files[0]) == [0]
    with pytest.raises(ConfigError, match="--keyframe-interval 0"):
        make_demo(tmp_path / "d", classes=["ring", "bounce"], videos_per_class=1, frames=20, size=32, keyframe_interval=0)
