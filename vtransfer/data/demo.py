"""Synthetic demo dataset: real H.264 videos of shapes that differ by look or by motion.

``make_demo(OUT)`` writes ``OUT/<class>/<class>_NNN.mp4`` plus ``OUT/categories.csv``
(``class,category``) and ``OUT/README.txt``. Every class belongs to one of two
categories. Every video shows 2-3 objects of its class (each with its own
colour, size, position and motion drawn from the class's generators), outlined
by a thin dark rim, on a cluttered background:

* **appearance** classes differ by *what is seen*: the objects' shape (disc,
  square, triangle, ring, cross, star), texture (stripes, checker) or colour
  (red vs blue star). The objects move, but their motion is drawn from one
  class-independent "nuisance" distribution, so motion says nothing about the class.
* **motion** classes all show the same kind of object -- one of a pool of
  asymmetric shapes (bar, ellipse, wedge, half-disc), solid or two-tone, in a
  random colour, drawn from the same distribution for every motion class -- and
  differ *only* in how they move (left vs right, up vs down, clockwise vs
  counter-clockwise, grow vs shrink, periodic bounce vs one-way, fast vs slow).

Why a model that ignores time cannot separate motion classes:

* the scene lives on a torus (objects leaving one edge re-enter at the opposite
  edge) and every start position / angle / phase is uniform, so the position and
  orientation in *any single frame* (first, middle or last) have the same
  distribution in every motion class; grow/shrink pulse with a random phase, so
  their size in any single frame has the same distribution too;
* the paired classes are exact time reversals of each other (left = right played
  backwards, shrink = grow played backwards, ...), so even the unordered *bag* of
  frames of a video has the same distribution in both classes of a pair.

The appearance shapes and the motion-object pool are disjoint, so the full
catalogue (``class_set="all"``) is a well-posed classification problem: a
rightward-moving disc is a ``disc``; a rightward-moving bar is ``move_right``.

Clutter makes it non-trivial: a random background colour with a low-frequency
noise texture, static soft distractor blobs, moving distractor blobs, per-pixel
sensor noise, and camera jitter (a small random global translation per frame).

Determinism: each file's randomness comes from ``numpy.random.SeedSequence``
seeded by ``(seed, crc32(class), index)``, so a video depends only on those three
values and the size options, never on which other classes are generated. The
encoder runs single-threaded; with libx264 the same seed gives byte-identical files.

Class sets: ``target`` (3 appearance + 3 motion) and ``source`` (6 appearance +
4 motion) share no class, so pretraining on ``source`` and fine-tuning on
``target`` is a genuine transfer experiment; ``all`` is the whole catalogue (23).
Both sets are closed under horizontal flip, so flip augmentation keeps labels.
"""

from __future__ import annotations

import math
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from vtransfer.utils.errors import ConfigError, DatasetError

APPEARANCE = "appearance"
MOTION = "motion"
CATEGORIES = (APPEARANCE, MOTION)

README_MARKER = "vtransfer demo dataset"
CATEGORIES_FILE = "categories.csv"
README_FILE = "README.txt"

# Geometry below is in pixels of a 64-pixel frame; it is multiplied by
# min(height, width) / 64 so other sizes show the same scene.
_REF_SIZE = 64.0
_OBJECT_RADIUS = (9.0, 13.0)  # object size range (reference pixels)
_OBJECT_COUNT = (2, 3)  # objects per video: several instances give a tiny model more evidence per frame
_OUTLINE = 1.2  # dark rim width (reference pixels): silhouettes stay visible whatever the colours


# ---------------------------------------------------------------------------
# What one video is made of
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectLook:
    """How the foreground object looks (independent of time).

    Attributes:
        shape: a key of :data:`SHAPES`.
        texture: ``solid``, ``stripes``, ``checker`` or ``split`` (two-tone halves).
        colour: primary RGB colour in [0, 1].
        colour2: secondary RGB colour (textures only).
        radius: size in pixels at scale 1 (the shape fits in a circle of this radius).
        period: texture period in units of ``radius``.
    """

    shape: str
    texture: str
    colour: tuple[float, float, float]
    colour2: tuple[float, float, float]
    radius: float
    period: float = 0.55


@dataclass(frozen=True)
class Trajectory:
    """Where the object is in each frame: centre (x, y) in pixels, angle (radians), scale."""

    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray
    scale: np.ndarray

    def reversed(self) -> Trajectory:
        """The same path played backwards (how paired motion classes are made)."""
        return Trajectory(self.x[::-1].copy(), self.y[::-1].copy(), self.angle[::-1].copy(), self.scale[::-1].copy())


@dataclass(frozen=True)
class Canvas:
    """The frame geometry a generator draws for: frames, height, width and the pixel unit."""

    frames: int
    height: int
    width: int

    @property
    def unit(self) -> float:
        """Pixels per reference pixel (geometry is specified for a 64x64 frame)."""
        return min(self.height, self.width) / _REF_SIZE


LookFn = Callable[[np.random.Generator, Canvas], ObjectLook]
MotionFn = Callable[[np.random.Generator, Canvas], Trajectory]


@dataclass(frozen=True)
class DemoClass:
    """One class of the catalogue: a category, a one-line description, and its two generators."""

    name: str
    category: str
    description: str
    look: LookFn
    motion: MotionFn


@dataclass
class DemoSummary:
    """What :func:`make_demo` wrote.

    Attributes:
        root: the output folder.
        classes: class names in catalogue order.
        categories: class -> ``appearance`` or ``motion``.
        counts: class -> number of videos written.
        files: every video written, in the order written.
        frames, height, width, fps, seed, codec: the generation settings.
        seconds: wall time of the whole run.
        total_bytes: total size of the video files.
    """

    root: Path
    classes: list[str]
    categories: dict[str, str]
    counts: dict[str, int]
    files: list[Path] = field(default_factory=list)
    frames: int = 0
    height: int = 0
    width: int = 0
    fps: int = 0
    seed: int = 0
    codec: str = ""
    seconds: float = 0.0
    total_bytes: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict (paths as strings, file list left out)."""
        return {
            "root": str(self.root),
            "classes": list(self.classes),
            "categories": dict(self.categories),
            "counts": dict(self.counts),
            "videos": len(self.files),
            "frames": self.frames,
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "seed": self.seed,
            "codec": self.codec,
            "seconds": round(self.seconds, 3),
            "total_bytes": self.total_bytes,
        }


# ---------------------------------------------------------------------------
# Shapes: signed distance in object-local units (negative inside, ~1 = radius)
# ---------------------------------------------------------------------------


def _box(u: np.ndarray, v: np.ndarray, bu: float, bv: float) -> np.ndarray:
    qu = np.abs(u) - bu
    qv = np.abs(v) - bv
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0)


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - 1.0


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.hypot(u, v) - 0.72) - 0.28


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 0.8, 0.8)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, centroid at the origin, circumradius 1.15: max over the three edges.
    inradius = 0.575
    d = None
    for k in range(3):
        a = -math.pi / 2 + k * 2 * math.pi / 3  # outward normals at -90, 30, 150 degrees
        e = u * math.cos(a) + v * math.sin(a) - inradius
        d = e if d is None else np.maximum(d, e)
    return d


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five points; radius swings between 1.1 (tips) and 0.5 (notches). Approximate distance.
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    tri = np.abs(((theta * 5 / (2 * math.pi)) % 1.0) - 0.5) * 2  # 1 at tips, 0 at notches
    return (r - (0.5 + 0.6 * tri)) * 0.7


def _bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 1.0, 0.38)


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.hypot(u / 1.0, v / 0.55) - 1.0) * 0.55


def _wedge(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # A disc with a 90-degree mouth opening towards +u ("pac-man").
    in_mouth = np.maximum((v - u) / math.sqrt(2), (-v - u) / math.sqrt(2))
    return np.maximum(_disc(u, v), -in_mouth)


def _half_disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.hypot(u, v + 0.35) - 1.0, v)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": _disc,
    "ring": _ring,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
    "bar": _bar,
    "ellipse": _ellipse,
    "wedge": _wedge,
    "half_disc": _half_disc,
}
"""Shape name -> signed distance function over object-local coordinates."""

MOTION_OBJECT_SHAPES = ("bar", "ellipse", "wedge", "half_disc")
"""The pool every motion class draws its object from (no appearance class uses these)."""


# ---------------------------------------------------------------------------
# Random building blocks (each draws from its own generator)
# ---------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _vivid(rng: np.random.Generator, hue: float | None = None) -> tuple[float, float, float]:
    """A saturated, bright colour (random hue unless given)."""
    h = rng.uniform(0, 1) if hue is None else hue
    return _hsv(h, rng.uniform(0.65, 1.0), rng.uniform(0.8, 1.0))


def _contrasting(rng: np.random.Generator, colour: tuple[float, float, float]) -> tuple[float, float, float]:
    """A second colour for a texture: a hue far from the first, or near-black/white."""
    if rng.uniform() < 0.3:
        return (0.08, 0.08, 0.08) if sum(colour) > 1.5 else (0.95, 0.95, 0.95)
    r, g, b = colour
    hue = _rgb_hue(r, g, b) + rng.uniform(0.3, 0.7)
    return _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))


def _rgb_hue(r: float, g: float, b: float) -> float:
    mx, mn = max(r, g, b), min(r, g, b)
    if mx == mn:
        return 0.0
    if mx == r:
        h = ((g - b) / (mx - mn)) % 6
    elif mx == g:
        h = (b - r) / (mx - mn) + 2
    else:
        h = (r - g) / (mx - mn) + 4
    return h / 6.0


def _radius(rng: np.random.Generator, c: Canvas) -> float:
    return rng.uniform(*_OBJECT_RADIUS) * c.unit


def _look(shape: str, texture: str = "solid", hue: float | None = None) -> LookFn:
    """A look generator for a fixed shape and texture; colour random unless ``hue`` is set."""

    def make(rng: np.random.Generator, c: Canvas) -> ObjectLook:
        base_hue = None if hue is None else hue + rng.uniform(-0.025, 0.025)
        colour = _vivid(rng, base_hue)
        colour2 = _contrasting(rng, colour)
        return ObjectLook(shape, texture, colour, colour2, _radius(rng, c), period=rng.uniform(0.45, 0.65))

    return make


def _motion_object(rng: np.random.Generator, c: Canvas) -> ObjectLook:
    """The shared look of every motion class: a pool shape, solid or two-tone, random colour."""
    shape = MOTION_OBJECT_SHAPES[rng.integers(len(MOTION_OBJECT_SHAPES))]
    texture = "split" if rng.uniform() < 0.5 else "solid"
    colour = _vivid(rng)
    return ObjectLook(shape, texture, colour, _contrasting(rng, colour), _radius(rng, c))


def _uniform_position(rng: np.random.Generator, c: Canvas) -> tuple[float, float]:
    return rng.uniform(0, c.width), rng.uniform(0, c.height)


def _linear(rng: np.random.Generator, c: Canvas, vx: float, vy: float, spin: float = 0.0) -> Trajectory:
    """Constant velocity (pixels/frame) from a uniform start on the torus; optional constant spin."""
    t = np.arange(c.frames, dtype=np.float64)
    x0, y0 = _uniform_position(rng, c)
    a0 = rng.uniform(0, 2 * math.pi)
    return Trajectory(x0 + vx * t, y0 + vy * t, a0 + spin * t, np.ones(c.frames))


def _nuisance_motion(rng: np.random.Generator, c: Canvas) -> Trajectory:
    """Appearance classes: random direction, speed 0-1.2 px/frame, random slow spin either way."""
    direction = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(0.0, 1.2) * c.unit
    spin = rng.uniform(-0.1, 0.1)
    return _linear(rng, c, speed * math.cos(direction), speed * math.sin(direction), spin)


def _translate(dx: float, dy: float) -> MotionFn:
    """One-way motion along the unit vector (dx, dy) (y points down) at 1.5-2.5 px/frame."""

    def make(rng: np.random.Generator, c: Canvas) -> Trajectory:
        speed = rng.uniform(1.5, 2.5) * c.unit
        return _linear(rng, c, speed * dx, speed * dy)

    return make


def _diagonal(dy: float) -> MotionFn:
    """One-way motion at 45 degrees, up (dy=-1) or down (dy=+1), to the left or right at random; 1.5-2.5 px/frame.

    Left and right are equally likely, so a horizontally flipped video stays in its class.
    """

    def make(rng: np.random.Generator, c: Canvas) -> Trajectory:
        speed = rng.uniform(1.5, 2.5) * c.unit / math.sqrt(2)
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        return _linear(rng, c, speed * side, speed * dy)

    return make


def _random_direction(lo: float, hi: float) -> MotionFn:
    """One-way motion in a random direction at ``lo``-``hi`` px/frame."""

    def make(rng: np.random.Generator, c: Canvas) -> Trajectory:
        direction = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(lo, hi) * c.unit
        return _linear(rng, c, speed * math.cos(direction), speed * math.sin(direction))

    return make


def _rotate(sign: float) -> MotionFn:
    """Spin in place at 0.12-0.22 rad/frame; sign +1 is clockwise on screen (y points down)."""

    def make(rng: np.random.Generator, c: Canvas) -> Trajectory:
        return _linear(rng, c, 0.0, 0.0, sign * rng.uniform(0.12, 0.22))

    return make


def _grow(rng: np.random.Generator, c: Canvas) -> Trajectory:
    """Pulses outwards: swells steadily (x2.2 in 80% of a 20-28 frame cycle), snaps back quickly.

    The cycle's phase is uniform, so the size in any single frame is uniform in
    log scale over [0.55, 1.2] -- the same as :func:`_shrink`, which is this played backwards.
    """
    lo, span = math.log(0.55), math.log(2.2)
    rise = 0.8
    period = rng.uniform(20.0, 28.0)
    phase = (rng.uniform() + np.arange(c.frames) / period) % 1.0
    q = np.where(phase < rise, phase / rise, (1.0 - phase) / (1.0 - rise))
    base = _linear(rng, c, 0.0, 0.0)
    return Trajectory(base.x, base.y, base.angle, np.exp(lo + span * q))


def _shrink(rng: np.random.Generator, c: Canvas) -> Trajectory:
    """Exactly :func:`_grow` played backwards: shrinks steadily, springs back quickly."""
    return _grow(rng, c).reversed()


def _time_reversed(motion: MotionFn) -> MotionFn:
    """The motion generator whose every path is ``motion``'s path played backwards."""

    def make(rng: np.random.Generator, c: Canvas) -> Trajectory:
        return motion(rng, c).reversed()

    return make


def _bounce(rng: np.random.Generator, c: Canvas) -> Trajectory:
    """Periodic back-and-forth along a random axis: amplitude 7-12 px, period 8-12 frames."""
    t = np.arange(c.frames, dtype=np.float64)
    axis = rng.uniform(0, 2 * math.pi)
    amplitude = rng.uniform(7.0, 12.0) * c.unit
    omega = 2 * math.pi / rng.uniform(8.0, 12.0)
    phase = rng.uniform(0, 2 * math.pi)
    base = _linear(rng, c, 0.0, 0.0)
    s = amplitude * np.sin(omega * t + phase)
    return Trajectory(base.x + s * math.cos(axis), base.y + s * math.sin(axis), base.angle, base.scale)


def _orbit(rng: np.random.Generator, c: Canvas) -> Trajectory:
    """Circles a random centre: radius 6-10 px, period 10-16 frames, clockwise or not at random (flip-safe)."""
    t = np.arange(c.frames, dtype=np.float64)
    radius = rng.uniform(6.0, 10.0) * c.unit
    omega = 2 * math.pi / rng.uniform(10.0, 16.0) * (1.0 if rng.uniform() < 0.5 else -1.0)
    phase = rng.uniform(0, 2 * math.pi)
    base = _linear(rng, c, 0.0, 0.0)
    return Trajectory(base.x + radius * np.cos(omega * t + phase), base.y + radius * np.sin(omega * t + phase),
                      base.angle, base.scale)


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------

_RED, _BLUE = 0.0, 0.62

_move_right = _translate(1.0, 0.0)
_move_down = _translate(0.0, 1.0)

CATALOGUE: dict[str, DemoClass] = {
    c.name: c
    for c in [
        # appearance: the look is the class; motion is the same random nuisance for all
        DemoClass("disc", APPEARANCE, "solid discs, random colours", _look("disc"), _nuisance_motion),
        DemoClass("square", APPEARANCE, "solid squares, random colours", _look("square"), _nuisance_motion),
        DemoClass("triangle", APPEARANCE, "solid triangles, random colours", _look("triangle"), _nuisance_motion),
        DemoClass("ring", APPEARANCE, "rings (annuli), random colours", _look("ring"), _nuisance_motion),
        DemoClass("cross", APPEARANCE, "plus-shaped crosses, random colours", _look("cross"), _nuisance_motion),
        DemoClass("striped", APPEARANCE, "discs with two-colour stripes", _look("disc", "stripes"), _nuisance_motion),
        DemoClass("checker", APPEARANCE, "squares with a two-colour checkerboard", _look("square", "checker"),
                  _nuisance_motion),
        DemoClass("red_star", APPEARANCE, "five-point stars, red", _look("star", hue=_RED), _nuisance_motion),
        DemoClass("blue_star", APPEARANCE, "five-point stars, blue", _look("star", hue=_BLUE), _nuisance_motion),
        # motion: the same random object for all; the motion is the class
        DemoClass("move_right", MOTION, "moves left to right, 1.5-2.5 px/frame", _motion_object, _move_right),
        DemoClass("move_left", MOTION, "moves right to left (move_right reversed)", _motion_object,
                  _time_reversed(_move_right)),
        DemoClass("move_down", MOTION, "moves top to bottom, 1.5-2.5 px/frame", _motion_object, _move_down),
        DemoClass("move_up", MOTION, "moves bottom to top (move_down reversed)", _motion_object,
                  _time_reversed(_move_down)),
        DemoClass("diagonal_up", MOTION, "moves diagonally upwards (up-left or up-right), 1.5-2.5 px/frame",
                  _motion_object, _diagonal(-1.0)),
        DemoClass("diagonal_down", MOTION, "moves diagonally downwards (diagonal_up reversed)", _motion_object,
                  _time_reversed(_diagonal(-1.0))),
        DemoClass("rotate_cw", MOTION, "spins clockwise in place, 7-13 deg/frame", _motion_object, _rotate(1.0)),
        DemoClass("rotate_ccw", MOTION, "spins counter-clockwise (rotate_cw reversed)", _motion_object,
                  _time_reversed(_rotate(1.0))),
        DemoClass("grow", MOTION, "swells steadily to 2.2x, then snaps back (20-28 frame cycle)", _motion_object,
                  _grow),
        DemoClass("shrink", MOTION, "shrinks steadily, then springs back (grow reversed)", _motion_object,
                  _shrink),
        DemoClass("bounce", MOTION, "oscillates back and forth along a random axis (periodic)", _motion_object,
                  _bounce),
        DemoClass("orbit", MOTION, "circles around a point (either way round), 10-16 frames per turn",
                  _motion_object, _orbit),
        DemoClass("fast", MOTION, "one-way in a random direction, fast (3.2-4.2 px/frame)", _motion_object,
                  _random_direction(3.2, 4.2)),
        DemoClass("slow", MOTION, "one-way in a random direction, slow (0.6-1.0 px/frame)", _motion_object,
                  _random_direction(0.6, 1.0)),
    ]
}
"""Every demo class by name, in a fixed order (appearance first, then motion)."""

TARGET_CLASSES: tuple[str, ...] = ("striped", "red_star", "ring", "move_up", "move_down", "bounce")
"""The transfer target: 3 appearance classes (one each by texture, colour and shape) + 3 motion
classes that look alike frame by frame."""

SOURCE_CLASSES: tuple[str, ...] = (
    "disc", "square", "triangle", "cross", "checker", "blue_star",
    "diagonal_up", "diagonal_down", "orbit", "fast",
)
"""The pretraining source: 6 appearance + 4 motion classes, none shared with the target.

Both sets are closed under horizontal flip (flipping a video never turns it into
another class), so the usual random-flip augmentation is safe on them; the
flip-sensitive pairs (move_left/move_right, rotate_cw/rotate_ccw) are only in ``all``.
"""

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "all": tuple(CATALOGUE),
    "source": SOURCE_CLASSES,
    "target": TARGET_CLASSES,
}
"""Named class sets accepted by ``make_demo(class_set=...)``."""


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _torus_delta(grid: np.ndarray, centre: float, period: int) -> np.ndarray:
    """Signed shortest offset from ``centre`` on a circle of length ``period``."""
    return (grid - centre + period / 2) % period - period / 2


def _smooth_noise(rng: np.random.Generator, h: int, w: int, channels: int, cutoff: float) -> np.ndarray:
    """Periodic low-frequency noise, unit standard deviation per channel (H x W x channels)."""
    white = rng.standard_normal((channels, h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    gain = np.exp(-(fx**2 + fy**2) / (2 * cutoff**2))
    out = np.fft.ifft2(np.fft.fft2(white) * gain).real
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-8
    return out.transpose(1, 2, 0)


def _blob(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, sigma: float, h: int, w: int) -> np.ndarray:
    dx = _torus_delta(xx, cx, w)
    dy = _torus_delta(yy, cy, h)
    return np.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def _texture_mix(look: ObjectLook, u: np.ndarray, v: np.ndarray, px_per_unit: np.ndarray | float) -> np.ndarray:
    """Weight of the secondary colour at object-local (u, v), anti-aliased (0..1)."""
    if look.texture == "solid":
        return np.zeros_like(u)
    if look.texture == "split":
        return np.clip(0.5 - u * px_per_unit, 0.0, 1.0)
    k = 2 * math.pi / look.period
    if look.texture == "stripes":
        wave = np.sin(k * u)
    elif look.texture == "checker":
        wave = np.sin(k * u) * np.sin(k * v)
    else:  # pragma: no cover - catalogue only uses the textures above
        raise ValueError(look.texture)
    return np.clip(0.5 - 2.0 * wave, 0.0, 1.0)


def _draw_object(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, look: ObjectLook,
                 cx: float, cy: float, angle: float, scale: float, outline: float = 0.0) -> None:
    """Composite the object onto ``img`` (H x W x 3, in place), wrapping around the edges."""
    h, w = img.shape[:2]
    r = look.radius * scale
    dx = _torus_delta(xx, cx, w)
    dy = _torus_delta(yy, cy, h)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (ca * dx + sa * dy) / r  # object-local axis +u points along (cos a, sin a) on screen
    v = (-sa * dx + ca * dy) / r
    sdf = SHAPES[look.shape](u, v) * r  # signed distance in pixels
    if outline > 0:
        # A thin dark outline keeps the silhouette visible whatever the colours.
        rim = np.clip(0.5 - (sdf - outline), 0.0, 1.0)[..., None]
        img *= 1 - 0.85 * rim
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    mix = _texture_mix(look, u, v, r)[..., None]
    colour = (1 - mix) * np.asarray(look.colour) + mix * np.asarray(look.colour2)
    img *= 1 - alpha
    img += alpha * colour


def render_video(name: str, index: int, *, seed: int = 0, frames: int = 24, height: int = 64,
                 width: int = 64, clutter: float = 1.0) -> np.ndarray:
    """Render one demo video as uint8 ``frames x height x width x 3`` RGB.

    ``clutter`` scales every nuisance (background texture, distractor blobs, camera
    jitter, sensor noise): 0 gives a plain background and a still camera, 1 is the
    default, larger is harder. The result depends only on (``seed``, ``name``,
    ``index``), the sizes and ``clutter``; the object and its motion do not depend on ``clutter``.
    Raises :class:`ConfigError` for an unknown class name.
    """
    if name not in CATALOGUE:
        raise ConfigError(f"unknown demo class {name!r}; known: {', '.join(CATALOGUE)}")
    spec = CATALOGUE[name]
    c = Canvas(frames, height, width)
    root = np.random.SeedSequence([seed, zlib.crc32(name.encode()), index])
    bg_rng, clutter_rng, look_rng, motion_rng, jitter_rng, noise_rng = (
        np.random.default_rng(s) for s in root.spawn(6)
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    # Background: a muted random colour, a low-frequency texture, static soft blobs.
    base = np.asarray(_hsv(bg_rng.uniform(), bg_rng.uniform(0.05, 0.45), bg_rng.uniform(0.25, 0.6)))
    texture = _smooth_noise(bg_rng, height, width, 3, cutoff=bg_rng.uniform(0.03, 0.09))
    texture_gain = clutter * np.array([bg_rng.uniform(0.03, 0.07), bg_rng.uniform(0.02, 0.05)])
    background = base + texture * texture_gain[0] + texture[..., :1] * texture_gain[1]
    for _ in range(clutter_rng.integers(1, 4)):
        cx, cy = _uniform_position(clutter_rng, c)
        weight = _blob(yy, xx, cx, cy, clutter_rng.uniform(3.0, 8.0) * c.unit, height, width)[..., None]
        colour = np.asarray(_hsv(clutter_rng.uniform(), clutter_rng.uniform(0.2, 0.7), clutter_rng.uniform(0.3, 0.9)))
        strength = min(1.0, clutter * clutter_rng.uniform(0.2, 0.5))
        background += strength * weight * (colour - background)

    # Moving distractors: soft blobs drifting across the torus.
    movers = []
    for _ in range(clutter_rng.integers(1, 3)):
        x0, y0 = _uniform_position(clutter_rng, c)
        direction = clutter_rng.uniform(0, 2 * math.pi)
        speed = clutter_rng.uniform(0.3, 2.0) * c.unit
        sigma = clutter_rng.uniform(2.5, 5.0) * c.unit
        colour = np.asarray(_hsv(clutter_rng.uniform(), clutter_rng.uniform(0.2, 0.8), clutter_rng.uniform(0.3, 1.0)))
        strength = min(1.0, clutter * clutter_rng.uniform(0.3, 0.6))
        movers.append((x0, y0, speed * math.cos(direction), speed * math.sin(direction), sigma, colour, strength))

    # The class's objects: each draws its own look and its own motion from the class's generators.
    count = int(look_rng.integers(_OBJECT_COUNT[0], _OBJECT_COUNT[1] + 1))
    objects = [(spec.look(look_rng, c), spec.motion(motion_rng, c)) for _ in range(count)]

    # Camera jitter: the whole scene shifts by a small whole-pixel offset that wanders
    # (a smoothed random walk, like a hand-held camera), at most 2 px at the default clutter.
    limit = 2 * c.unit * clutter
    walk = np.cumsum(jitter_rng.normal(0.0, 0.6 * c.unit * clutter, size=(frames, 2)), axis=0)
    walk -= walk.mean(axis=0)
    shifts = np.rint(np.clip(walk, -limit, limit)).astype(int)

    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        sy, sx = int(shifts[t, 0]), int(shifts[t, 1])
        img = np.roll(background, (sy, sx), axis=(0, 1)).astype(np.float32)
        for x0, y0, vx, vy, sigma, colour, strength in movers:
            weight = strength * _blob(yy, xx, x0 + vx * t + sx, y0 + vy * t + sy, sigma, height, width)[..., None]
            img += weight * (colour - img)
        for look, path in objects:
            _draw_object(img, yy, xx, look, path.x[t] + sx, path.y[t] + sy, path.angle[t], path.scale[t],
                         outline=_OUTLINE * c.unit)
        img += noise_rng.normal(0.0, 0.015 * clutter, size=img.shape)
        video[t] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return video


# ---------------------------------------------------------------------------
# Encoding and the dataset folder
# ---------------------------------------------------------------------------


def encode_video(path: Path, video: np.ndarray, *, fps: int = 12, codec: str = "libx264",
                 keyframe_interval: int | None = None) -> None:
    """Write uint8 ``T x H x W x 3`` RGB frames to ``path`` (yuv420p, single-threaded encoder).

    ``keyframe_interval`` is the most frames between keyframes (default: one
    second, ``fps``, so that decoders' seeking is exercised; x264's own default
    is 250, which is what most re-encoded datasets have).

    Raises :class:`ConfigError` when the codec is unknown or cannot encode these frames.
    """

    t, h, w, _ = video.shape
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=fps)
            # MJPEG only takes full-range ("j") YUV; everything else gets plain yuv420p.
            stream.width, stream.height, stream.pix_fmt = w, h, "yuvj420p" if codec == "mjpeg" else "yuv420p"
            stream.codec_context.thread_count = 1
            keyint = max(1, keyframe_interval or fps)
            if codec in ("libx264", "h264"):
                # x264's macroblock-tree rate control made repeated encodes of the same frames differ
                # (measured with PyAV 18 / x264 core 165); without it the output is byte-identical.
                stream.options = {"crf": "18", "preset": "medium", "threads": "1",
                                  "x264-params": f"keyint={keyint}:mbtree=0"}
            else:
                stream.codec_context.gop_size = keyint
                stream.codec_context.bit_rate = 4_000_000
            for frame in video:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (av.error.FFmpegError, ValueError, KeyError) as e:  # unknown codec -> ValueError/UnknownCodecError
        path.unlink(missing_ok=True)
        raise ConfigError(f"--codec {codec!r}: cannot encode {path}: {e}") from e


def check_codec(codec: str) -> None:
    """Raise :class:`ConfigError` unless ``codec`` names a video encoder PyAV has."""

    try:
        found = av.codec.Codec(codec, "w")
    except (ValueError, av.error.FFmpegError) as e:
        raise ConfigError(f"--codec {codec!r}: no such encoder in this PyAV build ({e})") from e
    if found.type != "video":
        raise ConfigError(f"--codec {codec!r}: is a {found.type} encoder, not a video encoder")


def resolve_classes(class_set: str = "all", classes: list[str] | None = None) -> list[str]:
    """The class names :func:`make_demo` will write, in catalogue order.

    ``classes`` (optional) must be a subset of ``class_set``; errors name the option and the bad names.
    """
    if class_set not in CLASS_SETS:
        raise ConfigError(f"--set {class_set!r} is not one of {', '.join(CLASS_SETS)}")
    allowed = CLASS_SETS[class_set]
    if classes is None:
        return list(allowed)
    wanted = [c.strip() for c in classes if c.strip()]
    unknown = [c for c in wanted if c not in CATALOGUE]
    if unknown:
        raise ConfigError(f"--classes: unknown demo class(es) {', '.join(unknown)}; known: {', '.join(CATALOGUE)}")
    outside = [c for c in wanted if c not in allowed]
    if outside:
        raise ConfigError(f"--classes: {', '.join(outside)} not in the {class_set!r} set ({', '.join(allowed)})")
    if len(set(wanted)) < 2:
        raise ConfigError("--classes: name at least two different classes")
    return [c for c in CATALOGUE if c in set(wanted)]


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise ConfigError(f"--size {w}x{h}: height and width must be even and at least 16 (yuv420p)")
    return int(h), int(w)


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: folder is not empty; choose an empty folder or pass --overwrite")
        readme = out / README_FILE
        ours = readme.is_file() and readme.read_text(errors="replace").startswith(README_MARKER)
        if not ours:
            raise DatasetError(f"{out}: not empty and not a make-demo folder (no {README_FILE} written by "
                               "make-demo); refusing to delete it even with --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _readme_text(classes: list[str], *, class_set: str, frames: int, height: int, width: int, fps: int, seed: int,
                 videos_per_class: int, codec: str) -> str:
    lines = [
        f"{README_MARKER} (written by `vtransfer make-demo`; synthetic, free to use)",
        "",
        f"set: {class_set}   classes: {len(classes)}   videos per class: {videos_per_class}",
        f"frames: {frames}   size: {width}x{height} (WxH)   fps: {fps}   codec: {codec}   seed: {seed}",
        "",
        "Each video shows 2-3 objects of its class, each with its own colour, size and path.",
        "appearance classes differ by what is seen (shape, texture, colour); their objects",
        "move with the same random motion in every class.",
        "motion classes all show the same kind of object (bar, ellipse, wedge or half-disc,",
        "solid or two-tone, random colour) and differ only in how they move; paired classes",
        "are time reversals of each other, so no single frame tells them apart.",
        "Clutter: random background colour and texture, static and moving soft blobs,",
        "sensor noise and camera jitter. categories.csv maps class -> category.",
        "",
        "class, category: description",
    ]
    for name in classes:
        spec = CATALOGUE[name]
        lines.append(f"  {name}, {spec.category}: {spec.description}")
    return "\n".join(lines) + "\n"


def make_demo(
    out: Path,
    *,
    class_set: str = "all",
    classes: list[str] | None = None,
    videos_per_class: int = 12,
    frames: int = 24,
    size: int | tuple[int, int] = 64,
    fps: int = 12,
    seed: int = 0,
    codec: str = "libx264",
    overwrite: bool = False,
    clutter: float = 1.0,
    keyframe_interval: int | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> DemoSummary:
    """Write a synthetic demo dataset to ``out`` and return what was written.

    Args:
        out: output folder; must be empty or absent (or a previous make-demo folder with ``overwrite``).
        class_set: ``all`` (the whole :data:`CATALOGUE`), ``source`` or ``target`` (disjoint).
        classes: optional subset of the set's class names.
        videos_per_class: videos written per class (files ``<class>/<class>_000.mp4`` ...).
        frames: frames per video (at least 4).
        size: frame size, an int for square frames or ``(height, width)``; even, at least 16.
        fps: frame rate stored in the files.
        seed: the whole dataset is a function of the seed (and the other options).
        codec: PyAV encoder name (``libx264`` by default; the files are always ``.mp4``).
        overwrite: replace ``out`` if it is a previous make-demo folder.
        clutter: scale of background texture, distractors, camera jitter and noise (0 = none, 1 = default).
        keyframe_interval: most frames between keyframes (default ``fps``: one per second).
        workers: videos rendered and encoded at once, on as many threads (the files do not depend on it).
        progress: optional callback ``(videos_done, videos_total)`` called after each file.

    Raises:
        ConfigError: a bad option value (names the option).
        DatasetError: ``out`` is not empty (and not overwritable), or not a folder.
    """
    started = time.perf_counter()
    names = resolve_classes(class_set, classes)
    height, width = _parse_size(size)
    if videos_per_class < 1:
        raise ConfigError(f"--videos-per-class {videos_per_class}: must be at least 1")
    if frames < 4:
        raise ConfigError(f"--frames {frames}: must be at least 4 (motion needs several frames)")
    if fps < 1:
        raise ConfigError(f"--fps {fps}: must be at least 1")
    if keyframe_interval is not None and keyframe_interval < 1:
        raise ConfigError(f"--keyframe-interval {keyframe_interval}: must be at least 1")
    if not 0.0 <= clutter <= 4.0:
        raise ConfigError(f"--clutter {clutter}: must be between 0 and 4")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    check_codec(codec)
    out = Path(out)
    _prepare_folder(out, overwrite)
    # The README (with its marker line) goes first, so even a run cut short leaves a folder
    # that a later --overwrite recognises as make-demo's.
    (out / README_FILE).write_text(_readme_text(names, class_set=class_set, frames=frames, height=height,
                                                width=width, fps=fps, seed=seed,
                                                videos_per_class=videos_per_class, codec=codec))

    summary = DemoSummary(root=out, classes=names, categories={n: CATALOGUE[n].category for n in names},
                          counts={}, frames=frames, height=height, width=width, fps=fps, seed=seed, codec=codec)
    jobs = [(name, i, out / name / f"{name}_{i:03d}.mp4") for name in names for i in range(videos_per_class)]
    for name in names:
        (out / name).mkdir(exist_ok=True)

    def write(job: tuple[str, int, Path]) -> Path:
        name, i, path = job
        video = render_video(name, i, seed=seed, frames=frames, height=height, width=width, clutter=clutter)
        encode_video(path, video, fps=fps, codec=codec, keyframe_interval=keyframe_interval)
        return path

    # numpy's array arithmetic and the encoder release the GIL, so threads render and encode in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path in pool.map(write, jobs):
            summary.files.append(path)
            summary.total_bytes += path.stat().st_size
            if progress is not None:
                progress(len(summary.files), len(jobs))
    summary.counts = {name: videos_per_class for name in names}

    with open(out / CATEGORIES_FILE, "w", newline="") as f:
        f.write("class,category\n")
        for name in names:
            f.write(f"{name},{CATALOGUE[name].category}\n")
    summary.seconds = time.perf_counter() - started
    return summary
