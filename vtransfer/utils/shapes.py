"""Small shape helpers shared by the model families and the weight importers."""

from __future__ import annotations

from typing import Sequence


def as_pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(h, w) -> (h, w)``."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))
