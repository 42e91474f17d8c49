"""What each offline dataset is: :class:`OfflineDatasetSpec` and the registry of datasets."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import List, Mapping, Tuple

__all__ = [
    "IMAGE_SIZE",
    "IGNORE_INDEX",
    "OfflineDatasetSpec",
    "OFFLINE_DATASETS",
    "list_offline_datasets",
    "dataset_classes",
    "dataset_palette",
]

#: Side of every generated image and label, in pixels.
IMAGE_SIZE = 128
#: Label value that means "ignore this pixel" (mmseg's default ignore index).
IGNORE_INDEX = 255


@dataclass(frozen=True)
class OfflineDatasetSpec:
    """What one offline dataset is: its classes, their colours and how scenes are drawn.

    Attributes:
        name: dataset name (the directory name under the data root).
        description: one line for humans.
        kind: scene generator: ``"mosaic"`` (blobby Voronoi regions), ``"collage"``
            (shapes over a background) or ``"tiles"`` (crops of one annotated image).
        classes: class names; label value ``i`` is ``classes[i]``.
        palette: one RGB colour per class (for visualisation; mmseg ``metainfo``).
        sources: source key per class (``mosaic``/``collage``) or the one source (``tiles``).
        crop_px: range of the side, in source pixels (times the source's ``scale``), of the
            square source crop that covers the whole 128x128 canvas.
        colour_mode: ``"gray"``: sources are converted to grey levels with a per-source
            percentile stretch (texture-only cues) and written as RGB; ``"rgb"``: as is.
        num_train / num_val: number of scenes per split (every ``val_<shift>`` split has
            ``num_val`` images, paired by id with ``val``).
        seed: base seed of the scene generator.
    """

    name: str
    description: str
    kind: str
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    sources: Tuple[str, ...]
    crop_px: Tuple[int, int]
    colour_mode: str
    num_train: int = 160
    num_val: int = 48
    seed: int = 0

    @property
    def num_classes(self) -> int:
        """Number of classes (label values ``0 .. num_classes - 1``)."""
        return len(self.classes)


OFFLINE_DATASETS: Mapping[str, OfflineDatasetSpec] = MappingProxyType({s.name: s for s in (
    OfflineDatasetSpec(
        name="texture_mosaic",
        description="Blobby Voronoi regions filled with grey-level crops of 8 real textures; "
                    "class = texture",
        kind="mosaic",
        classes=("brick", "grass", "gravel", "moon", "tissue", "coins", "handwriting", "stars"),
        palette=((178, 34, 34), (34, 139, 34), (160, 160, 160), (240, 230, 140),
                 (186, 85, 211), (218, 165, 32), (30, 144, 255), (25, 25, 112)),
        sources=("brick", "grass", "gravel", "moon", "ihc", "coins", "text", "hubble"),
        crop_px=(96, 160),
        colour_mode="gray",
        seed=1101,
    ),
    OfflineDatasetSpec(
        name="photo_collage",
        description="Random ellipses, polygons and blobs over a background, each filled with a "
                    "crop of one of 6 natural colour photos; class = photo",
        kind="collage",
        classes=("astronaut", "cat", "coffee", "rocket", "retina", "deep_field"),
        palette=((255, 127, 14), (140, 86, 75), (214, 39, 40), (31, 119, 180),
                 (227, 119, 194), (23, 190, 207)),
        sources=("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble"),
        crop_px=(112, 176),
        colour_mode="rgb",
        seed=2202,
    ),
    OfflineDatasetSpec(
        name="nuclei",
        description="Fluorescence nuclei vs background: rotated/flipped tiles of a 2018 Data "
                    "Science Bowl image and its mask from the stardist 0.9.2 wheel",
        kind="tiles",
        classes=("background", "nucleus"),
        palette=((0, 0, 0), (255, 215, 0)),
        sources=("dsb_nuclei",),
        crop_px=(96, 144),
        colour_mode="gray",
        seed=3303,
    ),
)})


def list_offline_datasets() -> List[str]:
    """Names of the datasets :func:`build_offline_dataset` can build, sorted."""
    return sorted(OFFLINE_DATASETS)


def _get_spec(name: str) -> OfflineDatasetSpec:
    if not isinstance(name, str) or name not in OFFLINE_DATASETS:
        raise ValueError(
            f"unknown offline dataset {name!r}; available: {', '.join(list_offline_datasets())}")
    return OFFLINE_DATASETS[name]


def dataset_classes(name: str) -> List[str]:
    """Class names of dataset ``name``, indexed by label value."""
    return list(_get_spec(name).classes)


def dataset_palette(name: str) -> List[List[int]]:
    """One ``[r, g, b]`` colour per class of dataset ``name`` (mmseg ``metainfo['palette']``)."""
    return [list(c) for c in _get_spec(name).palette]

