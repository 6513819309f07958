"""One conversion of Python values to strict JSON types, for every file vtransfer writes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """``obj`` as strict-JSON types: NaN/inf -> ``None``; paths as text; tuples and sets as lists (sets sorted);
    numpy and torch scalars and arrays as numbers and lists; dataclasses as dicts; anything else as its text."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if hasattr(obj, "tolist"):  # numpy/torch scalars and arrays
        return to_jsonable(obj.tolist())
    return str(obj)
