"""The installed vtransfer's version, read from the package metadata (declared once, in pyproject.toml)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """vtransfer's version as installed; ``0+unknown`` when run from a source tree that was never installed."""
    try:
        return version("vtransfer")
    except PackageNotFoundError:
        return "0+unknown"
