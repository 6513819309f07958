"""How optical flow is computed and quantised (:class:`FlowSettings`): a declaration, cheap to import (no torch).

The run configuration validates ``--flow-*`` options with it before any video
is read; :mod:`vtransfer.data.flow` computes the flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vtransfer.utils.errors import ConfigError

#: Flow methods by name, each with a one-line description.
FLOW_METHODS: dict[str, str] = {
    "dis-ultrafast": "DIS optical flow, OpenCV preset ULTRAFAST (coarsest; fastest)",
    "dis-fast": "DIS optical flow, OpenCV preset FAST",
    "dis-medium": "DIS optical flow, OpenCV preset MEDIUM (finer patches and variational refinement)",
    "farneback": "Farneback polynomial-expansion flow (pyramid 0.5 x 3 levels, window 15, 3 iterations, poly 5/1.2)",
    "tvl1": "Dual TV-L1 flow (cv2.optflow, OpenCV's defaults: 5 scales, 5 warps); I3D's flow; much slower",
}

#: What a run's network sees: RGB frames, the optical flow at the same frame positions, or both
#: (two networks, one a stream, whose class probabilities are fused: a two-stream model's clips hold
#: the RGB channels then the flow channels).
STREAMS = ("rgb", "flow", "two-stream")
#: The streams that carry flow (and so need flow settings).
FLOW_STREAMS = ("flow", "two-stream")
#: How a two-stream model fuses its streams' class probabilities with the flow weight ``w``: ``mean`` is
#: ``(1 - w) p_rgb + w p_flow`` (the papers' average at ``w = 0.5``); ``geometric`` is the weighted geometric
#: mean, renormalised: the weighted average of the streams' log-probabilities (what averaging logits does).
FUSION_RULES = ("mean", "geometric")
#: A run's rule. On the demo's target set (3 seeds x top-layer, top-3, attentive-probe) geometric took the fused
#: test accuracy from 81.5% to 85.2% (motion classes 65.9% -> 77.0%, appearance 97.0% -> 93.3%, RGB alone 97.0%),
#: from the same trained streams; on yoga_poses (people never seen) and real_actions it changed nothing.
DEFAULT_FUSION_RULE = "geometric"

#: How frames are paired: see :func:`flow_pairs`.
PAIRINGS: tuple[str, ...] = ("next-frame", "next-sampled")

@dataclass(frozen=True)
class FlowSettings:
    """How flow is computed and quantised. Validated on construction.

    Attributes:
        method: one of :data:`FLOW_METHODS`.
        bound: clipping bound in pixels (of the frames as given, so it scales
            with the decode size); x and y outside ``[-bound, bound]`` are clipped.
        channels: 2 (x, y) or 3 (x, y, magnitude).
        pairing: ``"next-frame"`` or ``"next-sampled"`` (see :func:`flow_pairs`).

    Raises:
        ConfigError: an unknown method or pairing, a bound that is not a
            positive finite number, or channels other than 2 and 3.
    """

    method: str = "dis-medium"
    bound: float = 20.0
    channels: int = 2
    pairing: str = "next-frame"

    def __post_init__(self) -> None:
        if self.method not in FLOW_METHODS:
            raise ConfigError(f"unknown flow method {self.method!r}: choose one of {', '.join(FLOW_METHODS)}")
        try:
            bound = float(self.bound)
        except (TypeError, ValueError):
            bound = float("nan")
        if not (math.isfinite(bound) and bound > 0):
            raise ConfigError(f"flow bound must be a positive number of pixels, got {self.bound!r}")
        object.__setattr__(self, "bound", bound)
        if isinstance(self.channels, bool) or self.channels not in (2, 3):
            raise ConfigError(f"flow channels must be 2 (x, y) or 3 (x, y, magnitude), got {self.channels!r}")
        object.__setattr__(self, "channels", int(self.channels))
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown flow pairing {self.pairing!r}: choose one of {', '.join(PAIRINGS)}")

    def key(self) -> str:
        """A short string that identifies these settings, for cache keys and file names.

        Example: ``"flow-dis-medium-b20-c2-next-frame"``. Settings that give
        different uint8 flow always give different keys.
        """
        return f"flow-{self.method}-b{self.bound:g}-c{self.channels}-{self.pairing}"


#: What ``--stream flow`` computes unless told otherwise, chosen by measurement (``benchmarks/bench_flow.py``):
#: Farneback between sampled frames beat DIS on both real-video tasks there (people never seen in training,
#: and the arrow of time), at about half DIS-medium's speed; TV-L1 was best on the arrow of time but about
#: 45 times slower than Farneback. Three channels (x, y, magnitude) because a network started from RGB weights
#: keeps its RGB filters for them, where with two it sees only x + y (README, "Motion"); weights trained on flow
#: bring their own count instead (``i3d:kinetics400-flow``: 2).
DEFAULT_FLOW = FlowSettings("farneback", 20.0, 3, "next-sampled")
#: The short side (px) at which :data:`DEFAULT_FLOW`'s bound applies; ``--stream flow`` scales it to the working
#: resolution (the study found 8 px better than 20 at 128 px: motion in pixels shrinks with the frame).
FLOW_BOUND_AT = 256
