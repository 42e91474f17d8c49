"""Offline datasets written as folder datasets (mmseg layout plus ``classes.json``): the
built files copied or resized (:func:`export_offline_as_folder`), or the scenes rendered at
another size (:func:`render_offline_as_folder`); both through the one folder writer."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..folder.writer import Sample, check_destination, write_folder_dataset
from .build import _TRAIN_STREAM, _VAL_STREAM, _rng, build_offline_dataset
from .scenes import _SCENE_MAKERS
from .sources import _SOURCES, PathLike, _SourceBank
from .specs import _get_spec, dataset_classes, dataset_palette

__all__ = ["export_offline_as_folder", "render_offline_as_folder"]

_logger = logging.getLogger(__name__)


def _copied(src: Path, split: str, size: Optional[int]) -> Iterator[Sample]:
    for file in sorted(p.name for p in (src / "img_dir" / split).glob("*.png")):
        src_img, src_ann = src / "img_dir" / split / file, src / "ann_dir" / split / file
        if size is None:
            yield file, src_img, src_ann
            continue
        with Image.open(src_img) as im:
            img = im.convert("RGB").resize((int(size), int(size)), Image.Resampling.BILINEAR)
        with Image.open(src_ann) as im:
            ann = im.resize((int(size), int(size)), Image.Resampling.NEAREST)
        yield file, img, ann


def export_offline_as_folder(name: str, dest: PathLike, size: Optional[int] = None,
                             splits: Optional[Sequence[str]] = None, *,
                             data_root: Optional[PathLike] = None) -> Path:
    """Write the offline dataset ``name`` as a folder dataset at ``dest``.

    ``dest`` receives ``img_dir/<split>/*.png``, ``ann_dir/<split>/*.png`` and
    ``classes.json`` (``{"classes": [...], "palette": [...]}``), so that
    :func:`describe_folder_dataset` reads it without further arguments. The dataset is
    written into a temporary folder next to ``dest`` and renamed into place, so an
    interrupted export leaves no ``dest``.

    Args:
        name: an offline dataset (see ``list_offline_datasets``); built first if needed.
        dest: the folder to create; it must not exist or be empty.
        size: resize images (bilinear) and masks (nearest) to ``size x size``; None: copy the
            files unchanged.
        splits: the splits to write; None: all of the dataset's splits.
        data_root: where the offline datasets are built (default: their usual cache).

    Returns:
        ``dest``.

    Raises:
        FileExistsError: ``dest`` exists and is not an empty folder.
        ValueError: unknown dataset or split, or an invalid ``size``.
    """
    if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    dest = Path(dest).expanduser()
    check_destination(dest, f"the export of {name!r}")
    classes, palette = dataset_classes(name), dataset_palette(name)
    src = build_offline_dataset(name, data_root)
    available = json.loads((src / "meta.json").read_text())["splits"]
    wanted = list(available) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in available]
    if unknown or not wanted:
        raise ValueError(f"unknown or no splits {unknown or wanted!r} for offline dataset {name!r}; "
                         f"available: {', '.join(available)}")
    counts = write_folder_dataset(dest, classes, palette, {s: _copied(src, s, size) for s in wanted})
    _logger.info("exported offline dataset %s to %s (%s%s)", name, dest,
                 ", ".join(f"{s} {n}" for s, n in counts.items()),
                 f", {size}x{size}" if size is not None else "")
    return dest


def render_offline_as_folder(name: str, dest: PathLike, size: int, splits: Optional[List[str]] = None) -> Path:
    """Render offline dataset ``name``'s scenes at ``size`` x ``size`` pixels into a folder
    dataset (mmseg layout and ``classes.json``) at ``dest``.

    The scenes are the same as :func:`build_offline_dataset`'s (same layouts, same source
    areas), sampled from the source images at the larger size instead of upscaled, so a
    ``size=256`` copy has real detail at 256 px where the sources have it (the scikit-image
    photos are 300-512 px). Only ``train`` and ``val`` (default both); the shifted splits are
    defined at the built-in size. Written into a temporary folder and renamed into place;
    ``dest`` must not exist or be empty.
    """
    spec = _get_spec(name)
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    splits = list(splits or ["train", "val"])
    bad = [s for s in splits if s not in ("train", "val")]
    if bad:
        raise ValueError(f"render_offline_as_folder renders 'train' and 'val' only, got {bad}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; give a new folder")
    bank = _SourceBank()
    areas = {k: _SOURCES[k].areas() for k in spec.all_sources}
    make = _SCENE_MAKERS[spec.kind]

    def rendered(stream: int, count: int, area_idx: int) -> Iterator[Sample]:
        for i in range(count):
            scene = make(spec, _rng(spec, stream, i), i, {k: a[area_idx] for k, a in areas.items()})
            img, label, _ = scene.render(bank, n=size)
            yield f"{i:04d}.png", Image.fromarray(img, "RGB"), Image.fromarray(label, "L")

    todo = {"train": (_TRAIN_STREAM, spec.num_train, 0), "val": (_VAL_STREAM, spec.num_val, 1)}
    write_folder_dataset(dest, spec.classes, spec.palette, {s: rendered(*todo[s]) for s in todo if s in splits})
    return dest
