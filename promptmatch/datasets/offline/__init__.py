"""Small semantic-segmentation datasets built offline from real image content.

No real segmentation benchmark can be downloaded on the machines this project runs on, but
real photographs and textures ship inside PyPI packages: the sample images of
``scikit-image`` (``skimage/data/*``, public domain / CC0), one of ``matplotlib``
(``mpl-data/sample_data/grace_hopper.jpg``) and one annotated fluorescence nuclei image
inside the ``stardist==0.9.2`` wheel (BSD-3-Clause). This module turns them,
deterministically, into small datasets in the standard mmsegmentation layout::

    <root>/<name>/img_dir/<split>/<id>.png   RGB uint8, 128x128
    <root>/<name>/ann_dir/<split>/<id>.png   uint8 class indices, 255 = ignore
    <root>/<name>/meta.json                  classes, palette, sources, crop boxes, manifest

with the splits ``train``, ``val`` and the domain-shifted validation variants
``val_colour``, ``val_blur``, ``val_noise``, ``val_scale``, ``val_jpeg``, ``val_gamma``,
``val_defocus`` and ``val_motion`` (same scenes and ids as ``val``; the last four are
evaluation-only). Train and validation crops are taken from disjoint areas of every source image.

Datasets (see :data:`OFFLINE_DATASETS` and docs/datasets.md):

- ``texture_mosaic``: blobby Voronoi regions, each filled with a different grey-level texture
  (brick, grass, gravel, moon, tissue, coins, handwriting, stars); 8 classes.
- ``photo_collage``: random shapes over a background, each filled with a different natural
  colour photo (astronaut, cat, coffee, rocket, retina, deep field); 6 classes.
- ``nuclei``: nuclei vs background tiles of a 2018 Data Science Bowl fluorescence image
  read out of the stardist wheel (the package is never imported); 2 classes.
- ``clutter_objects``: 2-6 small objects (astronaut, cat, cameraman, rocket, logo) over a
  patchwork of cluttered photos and textures (background); 6 classes.
- ``thin_structures``: thin curves (vessel) and thin straight-ish polylines (wire) over a
  photo (background); 3 classes. Development data (held out for SPM v3, then looked at in
  its table; docs/datasets.md).
- ``long_tail``: blobby Voronoi regions of 16 different sources, region classes drawn from
  a Zipf-like distribution; 16 classes. Development data, as ``thin_structures``.
- ``texture_bands``: wavy, roughly parallel bands 4-40 px wide, each a grey-level crop of one
  of 5 similar-looking textures (cell, tissue, moon, gravel, retina); 5 classes, no
  background. Held out for SPM v4 (issue 19; docs/datasets.md).
- ``scale_objects``: 3-9 objects of radius 2.5-38 px (cell, colour wheel, coins, astronaut)
  over a photo (background, mostly Grace Hopper's portrait); 5 classes. Held out for SPM v4.

The package needs only numpy and Pillow at run time (plus the scikit-image data files, for
``scale_objects`` matplotlib's sample image and, for ``nuclei``, the stardist wheel file). It
never touches the network, except in :func:`fetch_stardist_wheel`, which runs
``pip download`` on request.

Modules: :mod:`.errors` (exceptions), :mod:`.sources` (source images, checksums, the
stardist wheel), :mod:`.specs` (:class:`OfflineDatasetSpec` and :data:`OFFLINE_DATASETS`),
:mod:`.registry` (:func:`register_offline_dataset`: adding a dataset, see docs/datasets.md),
:mod:`.canvas` (views, shapes and :class:`_Scene`, which renders a scene), :mod:`.scenes`
and :mod:`.scenes_extra` (scene generators), :mod:`.shifts` (:data:`SHIFT_REGISTRY`, the one
registry of domain shifts), :mod:`.build` (build, verify, lock), :mod:`.consumers`
(:func:`load_offline_split`, :func:`mmseg_dataset_config`) and :mod:`.export` (as folder
datasets: :func:`export_offline_as_folder`, :func:`render_offline_as_folder`).
"""
from __future__ import annotations

from ..._wheels import CACHE_ENV, WHEELS_ENV, cache_base  # noqa: F401  (module attributes callers use)
from .build import DATA_ENV, BUILD_VERSION, build_offline_dataset, default_data_root, verify_offline_dataset  # noqa: F401
from .consumers import load_offline_split, mmseg_dataset_config
from .errors import OfflineDataError, SourceChecksumError, SourceNotFoundError
from .export import export_offline_as_folder, render_offline_as_folder
from .registry import register_offline_dataset, unregister_offline_dataset
from .scenes import View  # noqa: F401
from .shifts import SHIFT_REGISTRY, SHIFTS, SPLITS, Shift
from .sources import (  # noqa: F401
    GUARD_PX,
    STARDIST_REQUIREMENT,
    STARDIST_VERSION,
    PathLike,
    default_wheel_dir,
    fetch_stardist_wheel,
    find_stardist_wheel,
)
from .specs import (
    IGNORE_INDEX,
    IMAGE_SIZE,
    OFFLINE_DATASETS,
    OfflineDatasetSpec,
    dataset_classes,
    dataset_palette,
    list_offline_datasets,
)

__all__ = [
    "BUILD_VERSION",
    "IMAGE_SIZE",
    "IGNORE_INDEX",
    "SPLITS",
    "SHIFTS",
    "OFFLINE_DATASETS",
    "OfflineDatasetSpec",
    "OfflineDataError",
    "SourceNotFoundError",
    "SourceChecksumError",
    "STARDIST_REQUIREMENT",
    "list_offline_datasets",
    "dataset_classes",
    "dataset_palette",
    "build_offline_dataset",
    "render_offline_as_folder",
    "export_offline_as_folder",
    "register_offline_dataset",
    "unregister_offline_dataset",
    "verify_offline_dataset",
    "load_offline_split",
    "mmseg_dataset_config",
    "default_data_root",
    "default_wheel_dir",
    "find_stardist_wheel",
    "fetch_stardist_wheel",
    "SHIFT_REGISTRY",
    "Shift",
]
