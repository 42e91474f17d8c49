"""Constants shared across promptmatch: normalisation statistics and the file endings of images.

One place for values that several modules need, so they cannot drift apart. This module imports
nothing from promptmatch (it is the bottom layer).
"""
from __future__ import annotations

from typing import FrozenSet, Tuple

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "DATASET_IMAGE_SUFFIXES"]

#: ImageNet channel statistics (RGB, on the 0..1 scale); the benchmark, the demo and prediction
#: normalise with them unless told otherwise.
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File-name endings (compared case-insensitively) of the files an image folder yields when
#: predicting or visualising: every format Pillow reads that users keep photos in.
IMAGE_SUFFIXES: FrozenSet[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})

#: Endings tried, in this order, for the images of a dataset folder in mmseg's layout when the
#: dataset names no ``img_suffix`` (mmseg takes one suffix per dataset: the one present is used).
DATASET_IMAGE_SUFFIXES: Tuple[str, ...] = (".png", ".jpg", ".jpeg")
