"""Small semantic-segmentation datasets built offline from real image content.

No real segmentation benchmark can be downloaded on the machines this project runs on, but
real photographs and textures ship inside PyPI packages: the sample images of
``scikit-image`` (``skimage/data/*``, public domain / CC0) and one annotated fluorescence
nuclei image inside the ``stardist==0.9.2`` wheel (BSD-3-Clause). This module turns them,
deterministically, into small datasets in the standard mmsegmentation layout::

    <root>/<name>/img_dir/<split>/<id>.png   RGB uint8, 128x128
    <root>/<name>/ann_dir/<split>/<id>.png   uint8 class indices, 255 = ignore
    <root>/<name>/meta.json                  classes, palette, sources, crop boxes, manifest

with the splits ``train``, ``val`` and the domain-shifted validation variants
``val_colour``, ``val_blur``, ``val_noise`` and ``val_scale`` (same scenes and ids as
``val``). Train and validation crops are taken from disjoint areas of every source image.

Datasets (see :data:`OFFLINE_DATASETS` and docs/datasets.md):

- ``texture_mosaic``: blobby Voronoi regions, each filled with a different grey-level texture
  (brick, grass, gravel, moon, tissue, coins, handwriting, stars); 8 classes.
- ``photo_collage``: random shapes over a background, each filled with a different natural
  colour photo (astronaut, cat, coffee, rocket, retina, deep field); 6 classes.
- ``nuclei``: nuclei vs background tiles of a 2018 Data Science Bowl fluorescence image
  read out of the stardist wheel (the package is never imported); 2 classes.

The module needs only numpy and Pillow at run time (plus the scikit-image data files and,
for ``nuclei``, the stardist wheel file). It never touches the network, except in
:func:`fetch_stardist_wheel`, which runs ``pip download`` on request.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import io
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import PIL
from PIL import Image, ImageFilter

from .. import _wheels
from .._wheels import CACHE_ENV, WHEELS_ENV, cache_base  # noqa: F401  (CACHE_ENV: module attribute callers use)

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
    "verify_offline_dataset",
    "load_offline_split",
    "mmseg_dataset_config",
    "default_data_root",
    "default_wheel_dir",
    "find_stardist_wheel",
    "fetch_stardist_wheel",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Bump whenever the generated content changes; datasets built by another version are rebuilt.
BUILD_VERSION = 1
#: Side of every generated image and label, in pixels.
IMAGE_SIZE = 128
#: Label value that means "ignore this pixel" (mmseg's default ignore index).
IGNORE_INDEX = 255
#: Domain shifts applied to the validation scenes; each gives a split ``val_<shift>``.
SHIFTS: Tuple[str, ...] = ("colour", "blur", "noise", "scale")
#: Every split written for each dataset, in build order.
SPLITS: Tuple[str, ...] = ("train", "val") + tuple(f"val_{s}" for s in SHIFTS)

STARDIST_VERSION = "0.9.2"
#: The pip requirement whose wheel holds the nuclei image.
STARDIST_REQUIREMENT = f"stardist=={STARDIST_VERSION}"
_STARDIST_WHEEL_GLOB = f"stardist-{STARDIST_VERSION}-*.whl"

DATA_ENV = "PROMPTMATCH_DATA"

#: Pixels left unused between the train area and the validation area of every source, so
#: that resampling filters reading a little outside a crop box cannot mix the two.
GUARD_PX = 16
_PNG_COMPRESS_LEVEL = 1  # zlib level: 3x faster than 6 for ~10% larger files


# ------------------------------------------------------------------------------ errors
class OfflineDataError(RuntimeError):
    """Base class of the errors raised while building an offline dataset."""


class SourceNotFoundError(OfflineDataError, FileNotFoundError):
    """A package file the datasets are built from (scikit-image data, stardist wheel) is missing."""


class SourceChecksumError(OfflineDataError):
    """A source file is present but its content differs from the pinned checksum."""


# ------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class _Source:
    """One source image and how it is split into a train area and a validation area.

    ``region`` is the usable rectangle ``(x0, y0, x1, y1)`` of the image (``None``: all of
    it). Along ``axis`` the last (``val_at="end"``) or first (``"start"``) ``val_px`` pixels
    of the region are the validation area; the train area is the rest minus ``GUARD_PX``.
    Crop sides drawn by a dataset are multiplied by ``scale`` for this source.
    """

    key: str
    origin: str  # "skimage" or "stardist"
    member: str  # file name in skimage/data, or path inside the stardist wheel
    size: Tuple[int, int]  # (width, height)
    axis: str  # "x" or "y"
    val_px: int
    val_at: str  # "start" or "end"
    sha256: str  # of the file bytes
    licence: str
    attribution: str
    scale: float = 1.0
    region: Optional[Tuple[int, int, int, int]] = None

    def areas(self) -> Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]:
        """``(train_area, val_area)`` as ``(x0, y0, x1, y1)`` boxes in source pixels."""
        x0, y0, x1, y1 = self.region or (0, 0, self.size[0], self.size[1])
        lo, hi = (x0, x1) if self.axis == "x" else (y0, y1)
        if self.val_at == "end":
            val, train = (hi - self.val_px, hi), (lo, hi - self.val_px - GUARD_PX)
        else:
            val, train = (lo, lo + self.val_px), (lo + self.val_px + GUARD_PX, hi)
        if self.axis == "x":
            return (train[0], y0, train[1], y1), (val[0], y0, val[1], y1)
        return (x0, train[0], x1, train[1]), (x0, val[0], x1, val[1])


_CC0_TEXTURES = "CC0-1.0"
_SOURCES: Mapping[str, _Source] = MappingProxyType({s.key: s for s in (
    # --- textures (scikit-image) ---
    _Source("brick", "skimage", "brick.png", (512, 512), "x", 168, "end",
            "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
            _CC0_TEXTURES, "scikit-image data.brick(): Bricks25 from CC0Textures (cc0textures.com)"),
    _Source("grass", "skimage", "grass.png", (512, 512), "y", 168, "end",
            "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
            _CC0_TEXTURES, "scikit-image data.grass(): 'Grass 01' by linolafett (DeviantArt)"),
    _Source("gravel", "skimage", "gravel.png", (512, 512), "x", 168, "start",
            "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
            _CC0_TEXTURES, "scikit-image data.gravel(): Gravel04 from CC0Textures (cc0textures.com)"),
    _Source("moon", "skimage", "moon.png", (512, 512), "y", 248, "start",
            "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
            "Not stated (ships with scikit-image, a BSD-3-Clause package)",
            "scikit-image data.moon(): surface of the moon", scale=1.5),
    _Source("ihc", "skimage", "ihc.png", (512, 512), "x", 168, "end",
            "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
            "No known copyright restrictions (scikit-image)",
            "scikit-image data.immunohistochemistry(): colonic glands, Center for Microscopy "
            "And Molecular Imaging (CMMI)"),
    _Source("coins", "skimage", "coins.png", (384, 303), "x", 168, "end",
            "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
            "No known copyright restrictions (scikit-image)",
            "scikit-image data.coins(): Greek coins from Pompeii, Brooklyn Museum collection"),
    _Source("text", "skimage", "text.png", (448, 172), "x", 168, "end",
            "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
            "Public domain (scikit-image: no known copyright restrictions)",
            "scikit-image data.text(): handwritten text, Wikipedia File:Corner.png"),
    _Source("hubble", "skimage", "hubble_deep_field.jpg", (1000, 872), "x", 280, "end",
            "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
            "Public domain (NASA)",
            "scikit-image data.hubble_deep_field(): Hubble eXtreme Deep Field, NASA/HubbleSite",
            scale=1.5),
    # --- natural colour photos (scikit-image) ---
    _Source("astronaut", "skimage", "astronaut.png", (512, 512), "x", 184, "end",
            "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
            "Public domain (NASA)",
            "scikit-image data.astronaut(): Eileen Collins, NASA Great Images database"),
    _Source("chelsea", "skimage", "chelsea.png", (451, 300), "x", 184, "start",
            "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
            "CC0-1.0", "scikit-image data.chelsea(): the cat Chelsea, by Stefan van der Walt"),
    _Source("coffee", "skimage", "coffee.png", (600, 400), "x", 184, "end",
            "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
            "CC0-1.0", "scikit-image data.coffee(): cup of coffee, by Rachel Michetti"),
    _Source("rocket", "skimage", "rocket.jpg", (640, 427), "x", 184, "start",
            "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
            "Public domain (SpaceX)", "scikit-image data.rocket(): Falcon 9 launch pad, SpaceX"),
    _Source("retina", "skimage", "retina.jpg", (1411, 1411), "y", 368, "end",
            "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
            "CC0-1.0", "scikit-image data.retina(): Wikimedia Commons File:Fundus_photograph_of_"
            "normal_left_eye.jpg (Mikael Häggström)", scale=2.0, region=(240, 240, 1170, 1170)),
    # --- fluorescence nuclei (stardist wheel) ---
    _Source("dsb_nuclei", "stardist", "stardist/data/images/img2d.tif", (512, 512), "y", 144, "end",
            "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
            "BSD-3-Clause (stardist 0.9.2 wheel)",
            "stardist.data.test_image_nuclei_2d(): fluorescence image and instance mask from the "
            "2018 Kaggle Data Science Bowl (Caicedo et al., Nature Methods 16, 2019)"),
)})
_STARDIST_MASK_MEMBER = "stardist/data/images/mask2d.tif"
_STARDIST_MASK_SHA256 = "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"


# ------------------------------------------------------------------------------ dataset specs
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

_SHIFT_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "colour": "hue rotation (8-20% of the circle), saturation x0.35-0.6 or x1.5-2, contrast "
              "x0.55-0.75 or x1.3-1.5, per-channel gains 0.8-1.2, brightness +-20",
    "blur": "Gaussian blur, radius 1.2-2.0 px",
    "noise": "additive Gaussian noise, sigma 12-20 (of 255) per pixel and channel",
    "scale": "zoom x1.5-2.0 into a random window of the validation scene, re-rendered from the "
             "sources (labels rasterised at the same view)",
})


# ------------------------------------------------------------------------------ public helpers
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


def default_data_root() -> Path:
    """Where datasets are built when no root is given: ``$PROMPTMATCH_DATA``, else
    ``$PROMPTMATCH_CACHE/datasets``, else ``~/.cache/promptmatch/datasets``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else cache_base() / "datasets"


def default_wheel_dir() -> Path:
    """The default directory searched for the stardist wheel (after ``$PROMPTMATCH_WHEELS``):
    ``$PROMPTMATCH_CACHE/wheels``, else ``~/.cache/promptmatch/wheels``."""
    return _wheels.default_wheel_dir()


# ------------------------------------------------------------------------------ stardist wheel


def _download_command(dest: PathLike) -> str:
    return f"python -m pip download --no-deps {STARDIST_REQUIREMENT} -d {shlex.quote(str(dest))}"


def find_stardist_wheel() -> Path:
    """The path of a ``stardist-0.9.2-*.whl`` file (any platform tag: only its data files
    are read).

    Looked for in ``$PROMPTMATCH_WHEELS`` (a directory, a wheel file, or several separated
    by ``os.pathsep``), then in :func:`default_wheel_dir`.

    Raises:
        SourceNotFoundError: no wheel was found; the message gives the command that
            downloads it.
    """
    found = _wheels.find_wheel(_STARDIST_WHEEL_GLOB)
    if found is not None:
        return found
    searched = _wheels.wheel_search_paths()
    dest = searched[0] if searched[0].suffix != ".whl" else searched[0].parent
    raise SourceNotFoundError(
        f"the 'nuclei' dataset reads its image out of the {STARDIST_REQUIREMENT} wheel "
        f"(BSD-3-Clause; the package is never installed or imported), and no "
        f"{_STARDIST_WHEEL_GLOB} was found in: {', '.join(str(p) for p in searched)}.\n"
        f"Download it (about 3 MB) with:\n    {_download_command(dest)}\n"
        f"or call promptmatch.datasets.fetch_stardist_wheel({str(dest)!r}), or point "
        f"${WHEELS_ENV} at a directory that holds it. On a platform without a stardist "
        f"wheel, add: --only-binary=:all: --platform manylinux_2_28_x86_64 "
        f"--python-version 3.11 --implementation cp")


def fetch_stardist_wheel(dest: Optional[PathLike] = None) -> Path:
    """Download the stardist 0.9.2 wheel into ``dest`` with pip, unless one is already there.

    For install time only (the rest of this module never touches the network). Runs
    ``<this python> -m pip download --no-deps stardist==0.9.2 -d <dest>``; nothing is
    installed. ``dest`` defaults to :func:`default_wheel_dir`.

    Returns:
        The path of the wheel file. Its nuclei image and mask are checked against their
        pinned sha256 digests.

    Raises:
        OfflineDataError: pip failed, or produced no wheel (e.g. only an sdist exists for
            this platform: see the message of :func:`find_stardist_wheel`).
        SourceChecksumError: the wheel's data files differ from the pinned ones.
    """
    dest = Path(dest).expanduser() if dest is not None else default_wheel_dir()
    found = _wheels.wheels_in(dest, _STARDIST_WHEEL_GLOB)
    if not found:
        _wheels.pip_download(STARDIST_REQUIREMENT, dest, OfflineDataError)
        found = _wheels.wheels_in(dest, _STARDIST_WHEEL_GLOB)
        if not found:
            raise OfflineDataError(
                f"pip download put no {_STARDIST_WHEEL_GLOB} into {dest} (only an sdist for this "
                f"platform?). Retry with: {_download_command(dest)} --only-binary=:all: "
                f"--platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp")
    wheel = found[0]
    with zipfile.ZipFile(wheel) as zf:
        _read_checked_member(zf, _SOURCES["dsb_nuclei"].member, _SOURCES["dsb_nuclei"].sha256, wheel)
        _read_checked_member(zf, _STARDIST_MASK_MEMBER, _STARDIST_MASK_SHA256, wheel)
    return wheel


def _read_checked_member(zf: zipfile.ZipFile, member: str, sha256: str, wheel: Path) -> bytes:
    try:
        data = zf.read(member)
    except KeyError:
        raise SourceChecksumError(f"{wheel} has no member {member!r}: not a stardist "
                                  f"{STARDIST_VERSION} wheel?") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SourceChecksumError(
            f"{member} in {wheel} has sha256 {got}, expected {sha256}: not the file of "
            f"{STARDIST_REQUIREMENT}; delete the wheel and download it again")
    return data


# ------------------------------------------------------------------------------ source loading
def _skimage_data_dir() -> Path:
    # locate the package on sys.path without importing it (nor consulting sys.modules)
    spec = importlib.machinery.PathFinder.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFoundError(
            "the offline datasets are built from the sample images of scikit-image, which is "
            "not installed: python -m pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class _SourceBank:
    """Loads, checks and prepares source images once per build."""

    def __init__(self) -> None:
        self._raw: Dict[str, Tuple[Image.Image, Dict[str, Any]]] = {}
        self._prepared: Dict[Tuple[str, str], Image.Image] = {}
        self._mask: Optional[Image.Image] = None

    def raw(self, key: str) -> Tuple[Image.Image, Dict[str, Any]]:
        if key not in self._raw:
            self._raw[key] = self._load(_SOURCES[key])
        return self._raw[key]

    def _load(self, src: _Source) -> Tuple[Image.Image, Dict[str, Any]]:
        info: Dict[str, Any] = {"origin": src.origin, "file": src.member}
        if src.origin == "skimage":
            path = _skimage_data_dir() / src.member
            if not path.is_file():
                raise SourceNotFoundError(
                    f"{path} is missing: reinstall scikit-image (python -m pip install "
                    f"--force-reinstall scikit-image)")
            data = path.read_bytes()
            got = hashlib.sha256(data).hexdigest()
            info["package"] = "scikit-image"
            if got != src.sha256:
                _logger.warning(
                    "scikit-image's %s differs from the file this dataset version was pinned "
                    "to (sha256 %s, expected %s): the built dataset will differ from the "
                    "reference build", src.member, got, src.sha256)
        else:
            wheel = find_stardist_wheel()
            with zipfile.ZipFile(wheel) as zf:
                data = _read_checked_member(zf, src.member, src.sha256, wheel)
                mask = _read_checked_member(zf, _STARDIST_MASK_MEMBER, _STARDIST_MASK_SHA256, wheel)
            self._mask = Image.fromarray(
                (np.asarray(Image.open(io.BytesIO(mask))) > 0).astype(np.uint8), "L")
            got = src.sha256
            info["package"] = STARDIST_REQUIREMENT
            info["mask_file"] = _STARDIST_MASK_MEMBER
            info["mask_sha256"] = _STARDIST_MASK_SHA256
        info["sha256"] = got
        info["matches_reference"] = got == src.sha256
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.size != src.size:
            raise SourceChecksumError(f"{src.member} is {img.size}, expected {src.size}")
        return img, info

    def image(self, key: str, mode: str) -> Image.Image:
        """The source as a PIL image ready to crop: 'L' (stretched grey) or 'RGB'."""
        if (key, mode) not in self._prepared:
            img, _ = self.raw(key)
            if mode == "rgb":
                out = img.convert("RGB")
            else:
                a = np.asarray(img).astype(np.float64)
                if a.ndim == 3:  # ITU-R 601 luma, as PIL's convert('L')
                    a = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
                lo, hi = np.percentile(a, [1.0, 99.5])
                a = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * 200.0 + 28.0
                out = Image.fromarray(np.round(a).astype(np.uint8), "L")
            self._prepared[(key, mode)] = out
        return self._prepared[(key, mode)]

    def mask(self, key: str) -> Image.Image:
        self.raw(key)
        assert self._mask is not None
        return self._mask

    def info(self, key: str) -> Dict[str, Any]:
        return self.raw(key)[1]


# ------------------------------------------------------------------------------ scenes
View = Tuple[float, float, float]  # (left, top, side) of the rendered window, canvas units
_FULL_VIEW: View = (0.0, 0.0, 1.0)


def _canvas_grid(view: View, n: int) -> Tuple[np.ndarray, np.ndarray]:
    a, b, w = view
    t = (np.arange(n, dtype=np.float64) + 0.5) / n * w
    return np.meshgrid(a + t, b + t)  # u (x, columns), v (y, rows)


def _sample_box(rng: np.random.Generator, src: _Source, area: Tuple[int, int, int, int],
                crop_px: Tuple[int, int]) -> Tuple[float, float, float]:
    side = float(rng.uniform(*crop_px)) * src.scale
    x0, y0, x1, y1 = area
    if side > min(x1 - x0, y1 - y0):
        raise AssertionError(f"crop side {side} does not fit area {area} of {src.key}")
    return float(rng.uniform(x0, x1 - side)), float(rng.uniform(y0, y1 - side)), side


def _view_box(box: Tuple[float, float, float], view: View) -> Tuple[float, float, float, float]:
    x, y, s = box
    a, b, w = view
    return (x + a * s, y + b * s, x + (a + w) * s, y + (b + w) * s)


class _Scene:
    """A scene: per-class source crops plus a label geometry, renderable at any view."""

    def __init__(self, spec: OfflineDatasetSpec, layers: List[Tuple[int, str, Tuple[float, float, float]]],
                 geometry: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 post: Tuple[int, int] = (0, 0)) -> None:
        self.spec = spec
        self.layers = layers  # (class index, source key, (x, y, side))
        self.geometry = geometry  # (u, v) -> label, or None for tiles
        self.post = post  # (rot90 k, horizontal flip) applied after rendering (tiles)

    def render(self, bank: _SourceBank, view: View = _FULL_VIEW, n: int = IMAGE_SIZE
               ) -> Tuple[np.ndarray, np.ndarray, List[Dict[str, Any]]]:
        spec = self.spec
        crops = []
        if spec.kind == "tiles":
            cls, key, box = self.layers[0]
            vb = _view_box(box, view)
            img = np.asarray(bank.image(key, spec.colour_mode).resize((n, n), Image.BICUBIC, box=vb))
            label = np.asarray(bank.mask(key).resize((n, n), Image.NEAREST, box=vb)).astype(np.uint8)
            crops.append({"source": key, "box": list(vb)})
        else:
            u, v = _canvas_grid(view, n)
            label = self.geometry(u, v).astype(np.uint8)
            shape = (n, n) if spec.colour_mode == "gray" else (n, n, 3)
            img = np.zeros(shape, np.uint8)
            for cls, key, box in self.layers:
                vb = _view_box(box, view)
                crops.append({"class": spec.classes[cls], "source": key, "box": list(vb)})
                sel = label == cls
                if sel.any():
                    patch = np.asarray(bank.image(key, spec.colour_mode).resize(
                        (n, n), Image.BICUBIC, box=vb))
                    img[sel] = patch[sel]
        k, flip = self.post
        if k or flip:
            img, label = np.rot90(img, k), np.rot90(label, k)
            if flip:
                img, label = img[:, ::-1], label[:, ::-1]
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return np.ascontiguousarray(img), np.ascontiguousarray(label), crops


def _mosaic_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                  areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    c = spec.num_classes
    k = int(rng.integers(3, 6))
    others = [i for i in range(c) if i != index % c]
    classes = [index % c] + [others[j] for j in rng.permutation(len(others))[: k - 1]]
    seeds = rng.uniform(0.05, 0.95, (1, 2))
    for _ in range(200):
        if len(seeds) == k:
            break
        p = rng.uniform(0.05, 0.95, (1, 2))
        if np.min(np.hypot(*(seeds - p).T)) > 0.28:
            seeds = np.concatenate([seeds, p])
    while len(seeds) < k:  # pragma: no cover - 200 tries always suffice for k <= 5
        seeds = np.concatenate([seeds, rng.uniform(0.05, 0.95, (1, 2))])
    weights = rng.uniform(0.85, 1.2, k)
    m = 3
    freq = rng.uniform(1.5, 4.0, (k, m))
    ang = rng.uniform(0, 2 * np.pi, (k, m))
    phase = rng.uniform(0, 2 * np.pi, (k, m))
    amp = rng.uniform(0.02, 0.06, (k, m))
    cls_arr = np.asarray(classes)

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        d = np.empty((k,) + u.shape)
        for i in range(k):
            d[i] = np.hypot(u - seeds[i, 0], v - seeds[i, 1]) * weights[i]
            for j in range(m):
                d[i] += amp[i, j] * np.sin(2 * np.pi * freq[i, j] * (
                    np.cos(ang[i, j]) * u + np.sin(ang[i, j]) * v) + phase[i, j])
        return cls_arr[np.argmin(d, axis=0)]

    layers = []
    for cls in classes:
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry)


def _shape_mask(shape: Dict[str, Any], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cx, cy = shape["center"]
    du, dv = u - cx, v - cy
    if shape["type"] == "ellipse":
        ct, st = np.cos(shape["angle"]), np.sin(shape["angle"])
        x, y = ct * du + st * dv, -st * du + ct * dv
        return (x / shape["rx"]) ** 2 + (y / shape["ry"]) ** 2 <= 1.0
    if shape["type"] == "polygon":
        pts = shape["vertices"]
        inside = np.ones(u.shape, bool)
        for i in range(len(pts)):
            (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % len(pts)]
            inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
        return inside
    phi = np.arctan2(dv, du)
    r = shape["r"] * (1 + sum(a * np.sin(h * phi + p) for h, a, p in shape["harmonics"]))
    return np.hypot(du, dv) <= r


def _collage_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                   areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    c = spec.num_classes
    background = index % c
    n_shapes = int(rng.integers(2, 4))
    others = [i for i in range(c) if i != background]
    shape_classes = [others[j] for j in rng.permutation(len(others))[:n_shapes]]
    shapes = []
    for cls in shape_classes:
        kind = ("ellipse", "polygon", "blob")[int(rng.integers(0, 3))]
        center = rng.uniform(0.15, 0.85, 2)
        r = float(rng.uniform(0.18, 0.36))
        shape: Dict[str, Any] = {"type": kind, "class": cls, "center": center}
        if kind == "ellipse":
            shape.update(rx=r * rng.uniform(0.7, 1.3), ry=r * rng.uniform(0.7, 1.3),
                         angle=rng.uniform(0, np.pi))
        elif kind == "polygon":
            nv = int(rng.integers(3, 8))
            t = np.sort(rng.uniform(0, 2 * np.pi, nv))
            rx, ry, rot = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25), rng.uniform(0, np.pi)
            px, py = rx * np.cos(t), ry * np.sin(t)  # counter-clockwise (in u, v) on an ellipse
            ct, st = np.cos(rot), np.sin(rot)
            shape["vertices"] = [(center[0] + ct * x - st * y, center[1] + st * x + ct * y)
                                 for x, y in zip(px, py)]
            if _polygon_area(shape["vertices"]) < 0.2 * np.pi * rx * ry:
                # degenerate sliver: fall back to the ellipse through the same radii
                shape.update(type="ellipse", rx=rx, ry=ry, angle=rot)
        else:
            shape["r"] = r
            shape["harmonics"] = [(h, rng.uniform(0.0, 0.15), rng.uniform(0, 2 * np.pi))
                                  for h in (2, 3, 4)]
        shapes.append(shape)

    def geometry(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        label = np.full(u.shape, background, np.int64)
        for sh in shapes:
            label[_shape_mask(sh, u, v)] = sh["class"]
        return label

    layers = []
    for cls in [background] + shape_classes:
        key = spec.sources[cls]
        layers.append((cls, key, _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)))
    return _Scene(spec, layers, geometry)


def _polygon_area(pts: Sequence[Tuple[float, float]]) -> float:
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _tiles_scene(spec: OfflineDatasetSpec, rng: np.random.Generator, index: int,
                 areas: Mapping[str, Tuple[int, int, int, int]]) -> _Scene:
    key = spec.sources[0]
    box = _sample_box(rng, _SOURCES[key], areas[key], spec.crop_px)
    post = (int(rng.integers(0, 4)), int(rng.integers(0, 2)))
    return _Scene(spec, [(-1, key, box)], None, post)  # type: ignore[arg-type]


_SCENE_MAKERS = {"mosaic": _mosaic_scene, "collage": _collage_scene, "tiles": _tiles_scene}


# ------------------------------------------------------------------------------ shifts
def _colour_shift(img: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, Dict[str, Any]]:
    hue = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.2))
    sat = float(rng.uniform(0.35, 0.6) if rng.random() < 0.5 else rng.uniform(1.5, 2.0))
    contrast = float(rng.uniform(0.55, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.5))
    gains = rng.uniform(0.8, 1.2, 3)
    brightness = float(rng.uniform(-20, 20))
    hsv = np.asarray(Image.fromarray(img, "RGB").convert("HSV")).astype(np.float64)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0, 256.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
    x = np.asarray(Image.fromarray(np.round(hsv).astype(np.uint8), "HSV").convert("RGB"))
    x = x.astype(np.float64)
    x = (x - x.mean()) * contrast + x.mean()
    x = x * gains + brightness
    out = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return out, {"hue": hue, "saturation": sat, "contrast": contrast,
                 "gains": [float(g) for g in gains], "brightness": brightness}


def _blur_shift(img: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, Dict[str, Any]]:
    radius = float(rng.uniform(1.2, 2.0))
    out = np.asarray(Image.fromarray(img, "RGB").filter(ImageFilter.GaussianBlur(radius)))
    return out, {"radius": radius}


def _noise_shift(img: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, Dict[str, Any]]:
    sigma = float(rng.uniform(12, 20))
    x = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8), {"sigma": sigma}


# ------------------------------------------------------------------------------ build
def _rng(spec: OfflineDatasetSpec, stream: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, stream, index])))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _build_into(spec: OfflineDatasetSpec, out: Path) -> Dict[str, Any]:
    bank = _SourceBank()
    keys = list(dict.fromkeys(spec.sources))
    areas = {k: _SOURCES[k].areas() for k in keys}
    for k in keys:
        bank.raw(k)  # fail early (missing wheel, bad checksum) before writing anything
    make = _SCENE_MAKERS[spec.kind]
    files: Dict[str, str] = {}
    content = hashlib.sha256()
    samples: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SPLITS}

    def write(split: str, idx: str, img: np.ndarray, label: np.ndarray) -> None:
        for sub, arr, mode in (("img_dir", img, "RGB"), ("ann_dir", label, "L")):
            rel = f"{sub}/{split}/{idx}.png"
            path = out / rel
            Image.fromarray(arr, mode).save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
            files[rel] = _sha256_file(path)
            content.update(rel.encode() + str(arr.shape).encode() + arr.tobytes())

    for split in SPLITS:
        (out / "img_dir" / split).mkdir(parents=True)
        (out / "ann_dir" / split).mkdir(parents=True)
    for split, stream, count in (("train", 0, spec.num_train), ("val", 1, spec.num_val)):
        area_idx = 0 if split == "train" else 1
        for i in range(count):
            idx = f"{i:04d}"
            scene = make(spec, _rng(spec, stream, i), i, {k: a[area_idx] for k, a in areas.items()})
            img, label, crops = scene.render(bank)
            write(split, idx, img, label)
            samples[split].append({"id": idx, "crops": crops})
            if split != "val":
                continue
            for s_i, shift in enumerate(SHIFTS):
                rng = _rng(spec, 10 + s_i, i)
                if shift == "scale":
                    zoom = float(rng.uniform(1.5, 2.0))
                    w = 1.0 / zoom
                    view = (float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - w)), w)
                    s_img, s_label, s_crops = scene.render(bank, view)
                    params: Dict[str, Any] = {"zoom": zoom, "view": list(view)}
                else:
                    fn = {"colour": _colour_shift, "blur": _blur_shift, "noise": _noise_shift}[shift]
                    (s_img, params), s_label, s_crops = fn(img, rng), label, crops
                write(f"val_{shift}", idx, s_img, s_label)
                samples[f"val_{shift}"].append({"id": idx, "crops": s_crops, "shift": params})

    sources = {}
    for k in keys:
        src = _SOURCES[k]
        train_area, val_area = areas[k]
        sources[k] = dict(bank.info(k), size=list(src.size), licence=src.licence,
                          attribution=src.attribution, scale=src.scale,
                          train_area=list(train_area), val_area=list(val_area))
    meta: Dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "build_version": BUILD_VERSION,
        "kind": spec.kind,
        "classes": list(spec.classes),
        "palette": [list(c) for c in spec.palette],
        "class_sources": ({c: s for c, s in zip(spec.classes, spec.sources)}
                          if spec.kind != "tiles" else None),
        "ignore_index": IGNORE_INDEX,
        "reduce_zero_label": False,
        "img_suffix": ".png",
        "seg_map_suffix": ".png",
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "colour_mode": spec.colour_mode,
        "crop_px": list(spec.crop_px),
        "guard_px": GUARD_PX,
        "splits": {s: len(samples[s]) for s in SPLITS},
        "shifts": {s: _SHIFT_DESCRIPTIONS[s] for s in SHIFTS},
        "sources": sources,
        "generator": {"module": __name__, "numpy": np.__version__,
                      "pillow": PIL.__version__,
                      "seed": spec.seed},
        "samples": samples,
        "content_sha256": content.hexdigest(),
        "files": dict(sorted(files.items())),
    }
    meta["meta_sha256"] = _meta_digest(meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _problems(path: Path, limit: int = 5) -> List[str]:
    """Why ``path`` is not a complete, intact offline dataset (empty list: it is)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return [f"{meta_path} is missing"]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{meta_path} is unreadable: {exc}"]
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return [f"{meta_path} has no file manifest"]
    if meta.get("meta_sha256") != _meta_digest(meta):
        return [f"{meta_path} was modified (its own checksum does not match)"]
    if meta.get("build_version") != BUILD_VERSION:
        return [f"built by version {meta.get('build_version')}, this is version {BUILD_VERSION}"]
    problems = []
    files: Dict[str, str] = meta["files"]
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif _sha256_file(f) != digest:
            problems.append(f"{rel} is corrupt (sha256 mismatch)")
        if len(problems) >= limit:
            return problems
    for sub in ("img_dir", "ann_dir"):
        for f in sorted((path / sub).rglob("*")):
            if f.is_file() and f.relative_to(path).as_posix() not in files:
                problems.append(f"{f.relative_to(path).as_posix()} is not in the manifest")
                if len(problems) >= limit:
                    return problems
    return problems


def verify_offline_dataset(path: PathLike) -> bool:
    """Whether ``path`` holds a complete, intact dataset built by this version.

    Checks that ``meta.json`` parses and matches its own checksum, that its build version is
    :data:`BUILD_VERSION`, that every file of its manifest exists with the recorded sha256,
    and that ``img_dir``/``ann_dir`` hold no file outside the manifest. Problems are logged
    at DEBUG level; this never raises for a broken dataset.
    """
    problems = _problems(Path(path))
    for p in problems:
        _logger.debug("%s: %s", path, p)
    return not problems


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield
        return
    with open(root / f".{name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_offline_dataset(name: str, root: Optional[PathLike] = None, force: bool = False) -> Path:
    """Build dataset ``name`` under ``root`` (default :func:`default_data_root`) if needed.

    If ``<root>/<name>`` already verifies (:func:`verify_offline_dataset`) and ``force`` is
    false, it is returned at once. Otherwise the dataset is built into a temporary directory
    next to it and renamed into place (the broken copy, if any, is removed), so an
    interrupted build never leaves a directory that looks complete. Concurrent builds of
    the same dataset are serialised with a lock file ``<root>/.<name>.lock`` (POSIX).

    Args:
        name: one of :func:`list_offline_datasets`.
        root: directory holding the datasets.
        force: rebuild even if an intact copy exists.

    Returns:
        The dataset directory ``<root>/<name>``.

    Raises:
        ValueError: unknown ``name`` (the message lists the available datasets).
        SourceNotFoundError: scikit-image or (for ``nuclei``) the stardist wheel is missing;
            the message says how to get it.
        SourceChecksumError: the stardist wheel's data files are not the pinned ones.
    """
    spec = _get_spec(name)
    root = Path(root).expanduser() if root is not None else default_data_root()
    target = root / spec.name
    if not force and target.is_dir():
        problems = _problems(target)
        if not problems:
            return target
        _logger.warning("offline dataset %s failed verification (%s); rebuilding",
                        target, "; ".join(problems[:3]))
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, spec.name):
        if not force and target.is_dir() and not _problems(target):
            return target  # built by another process while we waited for the lock
        for stale in root.glob(f".{spec.name}.tmp-*"):  # left by killed builds; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(f".{spec.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root))
        t0 = time.perf_counter()
        try:
            meta = _build_into(spec, tmp)
            old = None
            if target.exists() or target.is_symlink():
                old = root / f".{spec.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    _logger.info("built offline dataset %s (%s) in %.1f s: %s", spec.name,
                 ", ".join(f"{k} {v}" for k, v in meta["splits"].items()),
                 time.perf_counter() - t0, target)
    return target


# ------------------------------------------------------------------------------ consumers
def _resolve(path_or_name: PathLike, root: Optional[PathLike]) -> Path:
    if isinstance(path_or_name, str) and path_or_name in OFFLINE_DATASETS:
        return build_offline_dataset(path_or_name, root)
    path = Path(path_or_name)
    if not (path / "meta.json").is_file():
        raise ValueError(f"{path} is neither an offline dataset directory nor a dataset name "
                         f"({', '.join(list_offline_datasets())})")
    return path


def load_offline_split(path_or_name: PathLike, split: str = "train",
                       root: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """All images and labels of one split as arrays.

    Args:
        path_or_name: a dataset directory, or a dataset name (built under ``root`` first if
            needed).
        split: one of :data:`SPLITS`.

    Returns:
        ``(images, labels)``: uint8 arrays of shape ``(N, H, W, 3)`` and ``(N, H, W)``
        (label values are class indices or :data:`IGNORE_INDEX`), in id order.
    """
    path = _resolve(path_or_name, root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    ids = sorted(p.name for p in (path / "img_dir" / split).glob("*.png"))
    images = np.stack([np.asarray(Image.open(path / "img_dir" / split / i).convert("RGB")) for i in ids])
    labels = np.stack([np.asarray(Image.open(path / "ann_dir" / split / i)) for i in ids])
    return images, labels


def mmseg_dataset_config(path_or_name: PathLike, split: str = "train",
                         root: Optional[PathLike] = None) -> Dict[str, Any]:
    """An mmseg ``BaseSegDataset`` config dict for one split (no mmseg import).

    Add a ``pipeline`` to it; ``metainfo`` carries the classes and palette.
    """
    path = _resolve(path_or_name, root)
    meta = json.loads((path / "meta.json").read_text())
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(meta['splits'])}")
    return {
        "type": "BaseSegDataset",
        "data_root": str(path),
        "data_prefix": {"img_path": f"img_dir/{split}", "seg_map_path": f"ann_dir/{split}"},
        "img_suffix": meta["img_suffix"],
        "seg_map_suffix": meta["seg_map_suffix"],
        "reduce_zero_label": meta["reduce_zero_label"],
        "ignore_index": meta["ignore_index"],
        "metainfo": {"classes": tuple(meta["classes"]), "palette": [list(c) for c in meta["palette"]]},
    }
