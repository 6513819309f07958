"""Categories: an optional grouping of classes for per-category reports.

A categories file is a two-column CSV, ``class,category``, one class a line::

    class,category
    ApplyEyeMakeup,Human-Object Interaction
    Archery,Sports

The header is optional; ``class,group`` (as in UCF-101's five groups) and
``class,category`` are recognised. Every class named must be a class of the
dataset; dataset classes the file does not mention are put in the
``"uncategorised"`` category so every class has exactly one category.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

from vtransfer.utils.errors import DatasetError

#: Category given to dataset classes that the categories file does not name.
UNCATEGORISED = "uncategorised"

_CLASS_HEADERS = {"class", "classes", "class_name", "classname", "label", "name"}
_CATEGORY_HEADERS = {"category", "categories", "group", "supercategory", "super_category", "superclass"}


def read_categories_file(path: Path) -> dict[str, str]:
    """Parse a ``class,category`` CSV into ``{class: category}`` without checking class names.

    Raises:
        DatasetError: the file cannot be read, a line does not have two
            columns, a field is empty, or a class is given two different categories.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    except OSError as e:
        raise DatasetError(f"cannot read categories file {path}: {e.strerror or e}") from e
    mapping: dict[str, str] = {}
    first = True
    for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        cells = [c.strip() for c in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if len(cells) == 2 and cells[0].lower() in _CLASS_HEADERS and cells[1].lower() in _CATEGORY_HEADERS:
                continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise DatasetError(
                f"categories file {path} line {line_no}: expected 'class,category', got {','.join(row)!r}"
            )
        name, category = cells
        if mapping.get(name, category) != category:
            raise DatasetError(
                f"categories file {path} line {line_no}: class {name!r} is given two categories "
                f"({mapping[name]!r} and {category!r})"
            )
        mapping[name] = category
    if not mapping:
        raise DatasetError(f"categories file {path} names no classes")
    return mapping


def load_categories(path: Path, classes: Iterable[str]) -> dict[str, str]:
    """Map every class of the dataset to its category from a ``class,category`` CSV.

    Returns ``{class: category}`` with one entry per class in ``classes``;
    classes the file does not mention get :data:`UNCATEGORISED`.

    Raises:
        DatasetError: the file names classes that are not in ``classes`` (all
            are named, with a hint when only the letter case differs), or it is malformed.
    """
    classes = list(classes)
    mapping = read_categories_file(path)
    known = set(classes)
    unknown = sorted(c for c in mapping if c not in known)
    if unknown:
        by_lower = {c.lower(): c for c in classes}
        described = [
            f"{u} (did you mean {by_lower[u.lower()]}?)" if u.lower() in by_lower else u for u in unknown
        ]
        shown = ", ".join(described[:20]) + (f" (and {len(described) - 20} more)" if len(described) > 20 else "")
        raise DatasetError(
            f"categories file {path} names {len(unknown)} class(es) that are not in the dataset: {shown}"
        )
    return {c: mapping.get(c, UNCATEGORISED) for c in classes}
