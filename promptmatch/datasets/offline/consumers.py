"""Reading built offline datasets: as numpy arrays, or as an mmseg dataset config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from .build import build_offline_dataset
from .shifts import SPLITS
from .sources import PathLike
from .specs import list_offline_datasets

__all__ = ["load_offline_split", "mmseg_dataset_config"]


def _resolve(path_or_name: PathLike, root: Optional[PathLike]) -> Path:
    if isinstance(path_or_name, str) and path_or_name in list_offline_datasets():
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
