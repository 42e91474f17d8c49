"""What each offline dataset is: :class:`OfflineDatasetSpec` and the registry of datasets."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

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
            (shapes over a background), ``"tiles"`` (crops of one annotated image),
            ``"clutter"`` (small objects over a patchwork background), ``"thin"``
            (thin curves and polylines over a photo background), ``"bands"`` (wavy,
            roughly parallel bands) or ``"scales"`` (objects of very different sizes over a
            photo background).
        classes: class names; label value ``i`` is ``classes[i]``.
        palette: one RGB colour per class (for visualisation; mmseg ``metainfo``).
        sources: source key per class (every kind but ``tiles``) or the one source
            (``tiles``). For ``clutter``/``thin``/``scales`` the source of class 0 (the
            background) is the first of ``background_sources``.
        crop_px: range of the side, in source pixels (times the source's ``scale``), of the
            square source crop that covers the whole 128x128 canvas.
        colour_mode: ``"gray"``: sources are converted to grey levels with a per-source
            percentile stretch (texture-only cues) and written as RGB; ``"rgb"``: as is.
        num_train / num_val: number of scenes per split (every ``val_<shift>`` split has
            ``num_val`` images, paired by id with ``val``).
        seed: base seed of the scene generator.
        background_sources: (``clutter``/``thin``/``scales``) every source that fills
            class 0, the background; each background region draws one of them.
        class_weights: (``mosaic``) draw each region's class independently with these
            probabilities (normalised) instead of cycling the first region's class through
            all classes: a long-tailed class distribution.
        layout: kind-specific layout parameters (counts and size ranges, see
            :mod:`.scenes`); recorded in ``meta.json``.
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
    background_sources: Tuple[str, ...] = ()
    class_weights: Optional[Tuple[float, ...]] = None
    layout: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def num_classes(self) -> int:
        """Number of classes (label values ``0 .. num_classes - 1``)."""
        return len(self.classes)

    @property
    def all_sources(self) -> Tuple[str, ...]:
        """Every source key the dataset reads, without repeats, in first-use order."""
        return tuple(dict.fromkeys(self.sources + self.background_sources))


def _zipf_weights(n: int, exponent: float) -> Tuple[float, ...]:
    """``p_k`` proportional to ``1 / (k + 1) ** exponent`` for ``k = 0 .. n - 1``, normalised."""
    w = [1.0 / (k + 1) ** exponent for k in range(n)]
    total = sum(w)
    return tuple(x / total for x in w)


def _layout(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kw))


#: Exponent of the long-tailed class distribution of ``long_tail``.
LONG_TAIL_EXPONENT = 1.3


_REGISTRY: Dict[str, OfflineDatasetSpec] = {s.name: s for s in (
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
    OfflineDatasetSpec(
        name="clutter_objects",
        description="2-6 small objects (ellipses, polygons, blobs), each filled with a crop of "
                    "one of 5 photos/graphics, over a patchwork of crops of 4 cluttered "
                    "photos/textures; class = object source, or background",
        kind="clutter",
        classes=("background", "astronaut", "cat", "cameraman", "rocket", "logo"),
        palette=((0, 0, 0), (255, 127, 14), (140, 86, 75), (127, 127, 127), (31, 119, 180),
                 (44, 160, 44)),
        sources=("motorcycle_left", "astronaut", "chelsea", "camera", "rocket", "logo"),
        crop_px=(112, 160),
        colour_mode="rgb",
        seed=4404,
        background_sources=("motorcycle_left", "coffee", "gravel", "page"),
        layout=_layout(background_cells=(3, 5), objects=(2, 6), object_radius=(0.045, 0.125),
                       object_centre=(-0.04, 1.04)),
    ),
    OfflineDatasetSpec(
        name="thin_structures",
        description="Thin smooth curves ('vessel', 2-5 px, fundus texture) and thin straight-ish "
                    "polylines ('wire', 1.5-3 px, grey wall texture) over a crop of a natural "
                    "photo (motorcycle garage or coffee table)",
        kind="thin",
        classes=("background", "vessel", "wire"),
        palette=((0, 0, 0), (220, 20, 60), (0, 191, 255)),
        sources=("motorcycle_right", "retina", "clock"),
        crop_px=(112, 160),
        colour_mode="rgb",
        seed=5505,
        background_sources=("motorcycle_right", "coffee"),
        layout=_layout(vessels=(2, 4), vessel_width_px=(2.0, 5.0), vessel_length=(0.45, 0.9),
                       wires=(2, 4), wire_width_px=(1.5, 3.0), wire_length=(0.6, 1.2)),
    ),
    OfflineDatasetSpec(
        name="long_tail",
        description="Blobby Voronoi regions filled with crops of 16 different real textures and "
                    "photos; region classes drawn from a Zipf-like distribution "
                    f"(p_k ~ 1/(k+1)^{LONG_TAIL_EXPONENT}), so the last classes are rare",
        kind="mosaic",
        classes=("grass", "gravel", "brick", "astronaut", "coffee", "moon", "rocket", "tissue",
                 "motorcycle", "cat", "cameraman", "coins", "print", "handwriting", "retina",
                 "stars"),
        palette=((34, 139, 34), (160, 160, 160), (178, 34, 34), (255, 127, 14), (214, 39, 40),
                 (240, 230, 140), (31, 119, 180), (186, 85, 211), (255, 99, 71), (140, 86, 75),
                 (105, 105, 105), (218, 165, 32), (0, 128, 128), (30, 144, 255),
                 (227, 119, 194), (25, 25, 112)),
        sources=("grass", "gravel", "brick", "astronaut", "coffee", "moon", "rocket", "ihc",
                 "motorcycle_left", "chelsea", "camera", "coins", "page", "text", "retina",
                 "hubble"),
        crop_px=(96, 160),
        colour_mode="rgb",
        seed=6628,
        class_weights=_zipf_weights(16, LONG_TAIL_EXPONENT),
        layout=_layout(regions=(4, 6), min_seed_distance=0.24),
    ),
    # --- held out for SPM v4 (issue 19; docs/datasets.md): built 2026-12-06 ---
    OfflineDatasetSpec(
        name="texture_bands",
        description="Wavy, roughly parallel bands 4-40 px wide, each a grey-level crop of one of "
                    "5 similar-looking real micrograph and surface textures; adjacent bands "
                    "differ; class = texture",
        kind="bands",
        classes=("cell", "tissue", "moon", "gravel", "retina"),
        palette=((0, 206, 209), (186, 85, 211), (240, 230, 140), (160, 160, 160),
                 (220, 20, 60)),
        sources=("cell", "ihc", "moon", "gravel", "retina"),
        crop_px=(96, 160),
        colour_mode="gray",
        seed=7707,
        layout=_layout(band_width_px=(4.0, 40.0), waves=3, wave_amplitude=(0.01, 0.035),
                       wave_frequency=(0.5, 2.0), wave_drift=(-3.0, 3.0)),
    ),
    OfflineDatasetSpec(
        name="scale_objects",
        description="3-9 objects (ellipses, polygons, blobs) of radius 2.5-38 px (log-uniform), "
                    "largest drawn first, each a crop of one of 4 sources (cell micrograph, "
                    "colour wheel, coins, astronaut), over a crop of a portrait photo (Grace "
                    "Hopper; every fifth image the motorcycle garage, every fifth the coffee "
                    "table); class = object source, or background",
        kind="scales",
        classes=("background", "cell", "colour_wheel", "coins", "astronaut"),
        palette=((0, 0, 0), (0, 206, 209), (255, 20, 147), (218, 165, 32), (255, 127, 14)),
        sources=("grace_hopper", "cell", "color", "coins", "astronaut"),
        crop_px=(112, 160),
        colour_mode="rgb",
        seed=8808,
        background_sources=("grace_hopper", "motorcycle_right", "coffee"),
        layout=_layout(background_cycle=(0, 0, 0, 1, 2), objects=(3, 9),
                       object_radius=(0.02, 0.30), object_centre=(0.05, 0.95)),
    ),
)}
#: Every offline dataset by name (a read-only view: add one with ``register_offline_dataset``).
OFFLINE_DATASETS: Mapping[str, OfflineDatasetSpec] = MappingProxyType(_REGISTRY)


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

