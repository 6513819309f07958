"""What a backbone asks of its input clips: frames, stride, resize, crop, normalisation, RGB or flow.

A model declares one :class:`Preprocessing`; the data pipeline reads it and
knows nothing else of models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from dataclasses import replace as replace_fields
from typing import Any

from vtransfer.data.flow_settings import FLOW_STREAMS, STREAMS, FlowSettings
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
    per flow channel (``mean``/``std`` then have that many entries); or
    ``"two-stream"``: the three RGB channels followed by the flow channels,
    the input of a fused two-stream model (:mod:`vtransfer.models.two_stream`).
    """

    frames: int
    stride: int
    crop_size: tuple[int, int]
    resize_short: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    stream: str = "rgb"
    flow: FlowSettings | None = None

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ConfigError(f"preprocessing stream must be one of {', '.join(STREAMS)}, got {self.stream!r}")
        if (self.stream in FLOW_STREAMS) != (self.flow is not None):
            raise ConfigError("a flow stream needs its flow settings, and only a flow stream has them")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"preprocessing mean and std need one entry per channel ({self.channels}), "
                              f"got {len(self.mean)} and {len(self.std)}")

    @property
    def channels(self) -> int:
        """Channels of a clip: 3 for RGB, the flow's channel count for flow, both for two-stream."""
        return {"rgb": 3, "flow": 0, "two-stream": 3}[self.stream] + (self.flow.channels if self.flow else 0)

    @property
    def flow_from(self) -> int | None:
        """The first flow channel of a clip (``None`` without flow): a flip negates the flow's x there."""
        return {"rgb": None, "flow": 0, "two-stream": 3}[self.stream]

    def split_streams(self) -> tuple["Preprocessing", "Preprocessing"]:
        """A two-stream input's RGB part and flow part, each with its own normalisation.

        Raises:
            ConfigError: this is not a two-stream input.
        """
        if self.stream != "two-stream":
            raise ConfigError(f"only a two-stream input splits into streams; this one is {self.stream}")
        rgb = replace_fields(self, stream="rgb", flow=None, mean=self.mean[:3], std=self.std[:3])
        return rgb, replace_fields(self, stream="flow", mean=self.mean[3:], std=self.std[3:])

    @classmethod
    def join_streams(cls, rgb: "Preprocessing", flow: "Preprocessing") -> "Preprocessing":
        """The input of a model fusing an RGB and a flow network: both streams' channels, at shared positions.

        Raises:
            ConfigError: the two do not read the same frames (frames, stride, crop or resize differ).
        """
        if rgb.stream != "rgb" or flow.stream != "flow":
            raise ConfigError(f"two streams join an rgb and a flow input, got {rgb.stream} and {flow.stream}")
        geometry = ("frames", "stride", "crop_size", "resize_short")
        differ = [g for g in geometry if getattr(rgb, g) != getattr(flow, g)]
        if differ:
            raise ConfigError("the RGB and flow networks read different clips ("
                              + ", ".join(f"{g} {getattr(rgb, g)} vs {getattr(flow, g)}" for g in differ) + ")")
        return replace_fields(rgb, stream="two-stream", flow=flow.flow, mean=rgb.mean + flow.mean, std=rgb.std + flow.std)

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
    stream = pre.get("stream", "rgb")
    flow = pre.get("flow") if stream in FLOW_STREAMS else None
    what = "" if not isinstance(flow, dict) else (
        ("RGB and " if stream == "two-stream" else "")
        + f"optical flow ({flow.get('method')}, {flow.get('pairing')}, {flow.get('channels')} channels, "
        f"+-{flow.get('bound')} px) of ")
    return (f"{what}{pre.get('frames')} frames, stride {pre.get('stride')}, {crop[0]}x{crop[1]} crop of a "
            f"{pre.get('resize_short')} px short side")
