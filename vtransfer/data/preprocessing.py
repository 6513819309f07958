"""What a backbone asks of its input clips: frames, stride, resize, crop, normalisation.

A model declares one :class:`Preprocessing`; the data pipeline reads it and
knows nothing else of models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocessing:
    """How clips must be prepared for a backbone.

    The pipeline decodes ``frames`` frames taken every ``stride`` frames,
    resizes so the short side is ``resize_short``, crops ``crop_size``
    (height, width), converts uint8 to float in [0, 1], then applies
    ``(x - mean) / std`` per RGB channel. I3D's [-1, 1] range is
    ``mean = std = (0.5, 0.5, 0.5)``.
    """

    frames: int
    stride: int
    crop_size: tuple[int, int]
    resize_short: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
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
        )

    def replace(self, **changes: Any) -> "Preprocessing":
        """Return a copy with some fields changed (``None`` values are ignored)."""
        d = {k: v for k, v in asdict(self).items()}
        d.update({k: v for k, v in changes.items() if v is not None})
        if isinstance(d["crop_size"], int):
            d["crop_size"] = (d["crop_size"], d["crop_size"])
        return Preprocessing(**{**d, "crop_size": tuple(d["crop_size"])})
