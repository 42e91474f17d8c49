"""The offline datasets as mmseg datasets: ``type='promptmatch.OfflineSegDataset'``."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from mmseg.datasets import BaseSegDataset

from ..datasets import SPLITS, build_offline_dataset, dataset_classes, dataset_palette, list_offline_datasets
from ..registry import DATASETS

__all__ = ["OfflineSegDataset", "SubsetDataset"]


@DATASETS.register_module()
class OfflineSegDataset(BaseSegDataset):
    """One split of a promptmatch offline dataset, built (and checksum-verified) on first use.

    Args:
        name: an offline dataset (:func:`promptmatch.datasets.list_offline_datasets`:
            ``'texture_mosaic'``, ``'photo_collage'``, ``'nuclei'``, ``'clutter_objects'``, ...).
        split: ``'train'``, ``'val'`` or a shifted val split ``'val_<shift>'``
            (:data:`promptmatch.datasets.SPLITS`: colour, blur, noise, scale, jpeg, gamma,
            defocus, motion).
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


@DATASETS.register_module()
class SubsetDataset:
    """The samples ``indices`` of another dataset (any mmseg/mmengine dataset or wrapper, e.g.
    a ``ConcatDataset``): ``dict(type='promptmatch.SubsetDataset', dataset=..., indices=[...])``.

    Used by the benchmark to train on a training split minus its held-out part.
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        n = len(self.dataset)
        self.indices: List[int] = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"SubsetDataset: indices {bad[:5]} out of range for a dataset of {n} samples")

    @property
    def metainfo(self) -> dict:
        return self.dataset.metainfo

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> Any:
        return self.dataset[self.indices[idx]]
