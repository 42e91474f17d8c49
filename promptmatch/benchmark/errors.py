"""The benchmark's spec error, in a leaf module that the spec, its entries and the dataset
sources all import."""
from __future__ import annotations

__all__ = ["SpecError"]


class SpecError(ValueError):
    """A benchmark spec is malformed or names something that does not exist."""
