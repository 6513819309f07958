"""Typed errors that vtransfer raises for bad user input.

Every error carries a message meant for the person at the terminal: it names
the file (or option) at fault and says what is wrong with it. The CLI prints
these without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class VtransferError(Exception):
    """Base class for every error vtransfer reports to the user."""


class DatasetError(VtransferError):
    """The dataset folder, manifest, split file or categories file is unusable."""


class VideoDecodeError(VtransferError):
    """A video file could not be decoded.

    Attributes:
        path: the file that failed.
        reason: a short human-readable reason ("zero-byte file", "no video stream", ...).
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(VtransferError):
    """A checkpoint or weight source cannot be found, verified or loaded."""


class ConfigError(VtransferError):
    """An option, preset, policy or recipe value is invalid."""
