"""The offline datasets as mmseg datasets: ``type='promptmatch.OfflineSegDataset'``."""
from __future__ import annotations

from typing import Any, Optional

from mmseg.datasets import BaseSegDataset

from ..datasets import SPLITS, build_offline_dataset, dataset_classes, dataset_palette, list_offline_datasets
from ..registry import DATASETS

__all__ = ["OfflineSegDataset"]


@DATASETS.register_module()
class OfflineSegDataset(BaseSegDataset):
    """One split of a promptmatch offline dataset, built (and checksum-verified) on first use.

    Args:
        name: ``'texture_mosaic'``, ``'photo_collage'`` or ``'nuclei'``
            (:func:`promptmatch.datasets.list_offline_datasets`).
        split: ``'train'``, ``'val'`` or a shifted val split (``'val_colour'``,
            ``'val_blur'``, ``'val_noise'``, ``'val_scale'``).
        root: where datasets are cached (default ``$PROMPTMATCH_DATA`` or
            ``~/.cache/promptmatch/datasets``).
        **kwargs: the usual ``BaseSegDataset`` arguments (pipeline, ...).
    """

    def __init__(self, name: str, split: str = "train", root: Optional[str] = None, **kwargs: Any) -> None:
        if name not in list_offline_datasets():
            raise ValueError(f"unknown offline dataset {name!r}; available: {list_offline_datasets()}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of {name!r}; available: {list(SPLITS)}")
        path = build_offline_dataset(name, root=root)
        metainfo = dict(classes=tuple(dataset_classes(name)), palette=[list(p) for p in dataset_palette(name)])
        metainfo.update(kwargs.pop("metainfo", None) or {})
        kwargs.setdefault("img_suffix", ".png")
        kwargs.setdefault("seg_map_suffix", ".png")
        kwargs.setdefault("reduce_zero_label", False)
        super().__init__(
            data_root=str(path),
            data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"),
            metainfo=metainfo,
            **kwargs,
        )
