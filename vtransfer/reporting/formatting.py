"""Numbers as short text for report tables: percentages, parameter counts, durations, free-form values."""

from __future__ import annotations

import json
import math
from typing import Any

from vtransfer.utils.jsonable import to_jsonable


def format_pct(value: float | None, std: float | None = None, digits: int = 1) -> str:
    """A fraction as a percentage (``0.641`` -> ``"64.1%"``), with ``" ± std"`` when given; ``"—"`` for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if std is None or math.isnan(std):
        return f"{100 * value:.{digits}f}%"
    return f"{100 * value:.{digits}f} ± {100 * std:.{digits}f}%"


def format_count(n: int | float | None) -> str:
    """A parameter count in short form: ``950``, ``12.3K``, ``4.56M``, ``1.2B``."""
    if n is None:
        return "—"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float | None, std: float | None = None) -> str:
    """Seconds as ``"8.2s"``, ``"3m 05s"`` or ``"1h 02m"``, with ``" ± 4.1s"`` when ``std`` is given."""
    if seconds is None or math.isnan(seconds):
        return "—"

    def one(s: float) -> str:
        if s < 60:
            return f"{s:.1f}s"
        if s < 3600:
            return f"{int(s // 60)}m {int(round(s % 60)):02d}s"
        return f"{int(s // 3600)}h {int(round(s % 3600 / 60)):02d}m"

    return one(seconds) if std is None or math.isnan(std) else f"{one(seconds)} ± {one(std)}"


def format_value(value: Any) -> str:
    """Any value as one line of text: floats to 6 significant digits, nested values as compact JSON."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    return str(value)
