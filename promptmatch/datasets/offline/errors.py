"""The errors raised while building an offline dataset."""
from __future__ import annotations

__all__ = ["OfflineDataError", "SourceNotFoundError", "SourceChecksumError"]


class OfflineDataError(RuntimeError):
    """Base class of the errors raised while building an offline dataset."""


class SourceNotFoundError(OfflineDataError, FileNotFoundError):
    """A package file the datasets are built from (scikit-image data, stardist wheel) is missing."""


class SourceChecksumError(OfflineDataError):
    """A source file is present but its content differs from the pinned checksum."""
