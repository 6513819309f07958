"""What a backbone asks of its input clips: frames, stride, resize, crop, normalisation, RGB or flow.

A model declares one :class:`Preprocessing`; the data pipeline reads it and
knows nothing else of models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vtransfer.data.flow_settings import STREAMS, FlowSettings
from vtransfer.utils.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """How clips must be prepared for a backbone.

    The pipeline decodes ``frames`` frames taken every ``stride`` frames,
    resizes so the short side is ``resize_short``, crops ``crop_size``
    (height, width), converts uint8 to float in [0, 1], then applies
    ``(x - mean) / std`` per channel. I3D's [-1, 1] range is
    ``mean = std = (0.5, 0.5, 0.5)``.

    ``stream`` says what the clips hold: ``"rgb"`` frames, or ``"flow"``: the
    optical flow at the same frame positions, computed with ``flow``'s
    settings and quantised to uint8 (:mod:`vtransfer.data.flow`), one channel
    per flow channel (``mean``/``std`` then have that many entries).
    """

    frames: int
    stride: int
    crop_size: tuple[int, int]
    resize_short: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    stream: str = "rgb"
    flow: FlowSettings | None = None

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ConfigError(f"preprocessing stream must be one of {', '.join(STREAMS)}, got {self.stream!r}")
        if (self.stream == "flow") != (self.flow is not None):
            raise ConfigError("a flow stream needs its flow settings, and only a flow stream has them")

    @property
    def channels(self) -> int:
        """Channels of a clip: 3 for RGB, the flow's channel count for flow."""
        return self.flow.channels if self.flow is not None else 3

    def describe(self) -> str:
        """One line for reports: what the clips hold (flow says so; RGB is the default) and their geometry."""
        return describe_input(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists); RGB preprocessing has no stream keys."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.stream == "rgb":
            d.pop("stream"), d.pop("flow")
        else:
            d["flow"] = asdict(self.flow)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            frames=int(d["frames"]),
            stride=int(d["stride"]),
            crop_size=(int(d["crop_size"][0]), int(d["crop_size"][1])),
            resize_short=int(d["resize_short"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            stream=str(d.get("stream", "rgb")),
            flow=FlowSettings(**d["flow"]) if d.get("flow") else None,
        )

    def replace(self, **changes: Any) -> "Preprocessing":
        """Return a copy with some fields changed (``None`` values are ignored)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update({k: v for k, v in changes.items() if v is not None})
        if isinstance(d["crop_size"], int):
            d["crop_size"] = (d["crop_size"], d["crop_size"])
        return Preprocessing(**{**d, "crop_size": tuple(d["crop_size"])})


def describe_input(pre: dict[str, Any]) -> str:
    """One line for a (recorded) preprocessing dict, tolerant of fields an old record lacks."""
    crop = pre.get("crop_size") or ["?", "?"]
    flow = pre.get("flow") if pre.get("stream", "rgb") == "flow" else None
    what = "" if not isinstance(flow, dict) else (
        f"optical flow ({flow.get('method')}, {flow.get('pairing')}, {flow.get('channels')} channels, "
        f"+-{flow.get('bound')} px) of ")
    return (f"{what}{pre.get('frames')} frames, stride {pre.get('stride')}, {crop[0]}x{crop[1]} crop of a "
            f"{pre.get('resize_short')} px short side")
