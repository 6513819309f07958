"""A run's dataset: the videos with their splits, and the optional class -> category map."""

from __future__ import annotations

from pathlib import Path

from vtransfer.data.categories import load_categories
from vtransfer.data.scan import load_dataset
from vtransfer.run_config import DataConfig


def open_dataset(opts: DataConfig):
    """Scan (or read) the dataset and give every video a split."""

    return load_dataset(
        Path(opts.data),
        manifest=Path(opts.manifest) if opts.manifest else None,
        split_files=Path(opts.split_files) if opts.split_files else None,
        ratios=tuple(opts.ratios),
        split_seed=opts.split_seed,
        group_pattern=opts.group_pattern,
    )


def load_categories_for(path: Path | None, classes: list[str]) -> dict[str, str] | None:
    """Class -> category mapping from a categories file (``None`` when no file is given)."""
    if path is None:
        return None

    return load_categories(Path(path), classes)
