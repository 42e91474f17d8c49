"""``folder``: a user's image/mask folders in mmseg's layout (see
:mod:`promptmatch.datasets.folder`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import SpecError
from .base import DataSource, DatasetEntry, register_source, subset_config

__all__ = ["FolderEntry", "FolderSource", "folder_of"]


@dataclass
class FolderEntry(DatasetEntry):
    """A folder dataset: ``folder`` (its root, made absolute), optional ``classes`` (else the
    folder's classes.json / classes.txt), ``palette``, ``img_suffix``, ``seg_map_suffix``,
    ``reduce_zero_label`` and ``train_split`` (default ``train``); ``splits`` defaults to
    ``["val"]``. Values are kept as given: they are part of the cell key."""

    folder: Any = None
    classes: Any = None
    reduce_zero_label: Any = None
    palette: Any = None
    img_suffix: Any = None
    seg_map_suffix: Any = None
    train_split: Any = "train"

    def __post_init__(self, where: str) -> None:
        if not isinstance(self.folder, str) or not self.folder:
            raise SpecError(f"{where}: 'folder' must be the path of the dataset's root, got {self.folder!r}")
        self.folder = str(Path(self.folder).expanduser().resolve())
        if "classes" in self.given and (not isinstance(self.classes, list) or not self.classes
                                        or not all(isinstance(c, str) for c in self.classes)):
            raise SpecError(f"{where}: 'classes' must be a non-empty list of names (or leave it out and put a "
                            f"classes.json / classes.txt in the folder), got {self.classes!r}")
        super().__post_init__(where)


def folder_of(entry: Mapping[str, Any]):
    """The :class:`~promptmatch.datasets.FolderDataset` of a ``folder`` entry."""
    from promptmatch.datasets.folder import describe_folder_dataset

    train = [] if entry.get("eval_only") else [entry.get("train_split", "train")]  # eval-only: no train split
    splits = tuple(dict.fromkeys([*train, *entry.get("splits", ["val"])]))
    return describe_folder_dataset(entry["folder"], classes=entry.get("classes"), splits=splits,
                                   img_suffix=entry.get("img_suffix"),
                                   seg_map_suffix=entry.get("seg_map_suffix", ".png"),
                                   reduce_zero_label=bool(entry.get("reduce_zero_label", False)),
                                   palette=entry.get("palette"))


@register_source
class FolderSource(DataSource):
    """Folder datasets: checked file by file before any training; small ones load in memory."""

    name = "folder"
    entry_class = FolderEntry
    default_engine = "runner"  # promptmatch's folder engine: mmengine's Runner, no mmcv

    def classes(self, entry: Mapping[str, Any]) -> List[str]:
        return list(folder_of(entry).classes)

    def problems(self, entry: Mapping[str, Any], deep: bool, progress: bool
                 ) -> Tuple[List[str], Optional[List[str]]]:
        from promptmatch.datasets.folder import FolderDatasetError, check_folder_dataset

        problems: List[str] = []
        try:
            fd = folder_of(entry)
            if deep:
                check_folder_dataset(fd, check_labels=True, progress=progress)
            elif not fd.root.is_dir():
                problems.append(f"dataset {entry['name']!r}: folder {fd.root} does not exist")
            return problems, list(fd.classes)
        except FolderDatasetError as e:  # every problem of the folder, in one error
            return problems + [f"dataset {entry['name']!r}: {e}"], None

    def native_size_problem(self, entry: Mapping[str, Any], split: str) -> Optional[str]:
        from promptmatch.datasets.folder import FolderDatasetError, folder_image_sizes
        from promptmatch.datasets.folder.check import sizes_listing

        try:
            sizes = folder_image_sizes(folder_of(entry), split)
        except FolderDatasetError:  # reported by the data checks
            return None
        if len(sizes) <= 1:
            return None
        return (f"dataset {entry['name']!r}: the setting image_size is null (each image at its own size), but "
                f"img_dir/{split} holds images of {len(sizes)} different sizes ({sizes_listing(sizes)}), and the "
                "memory engine stacks a split at one size; set \"image_size\": <side> in the spec's settings (e.g. "
                "\"image_size\": 256) to resize every image and mask to side x side, or bring the images to one size")

    def train_count(self, entry: Mapping[str, Any]) -> int:
        from promptmatch.datasets.folder import folder_pairs

        return len(folder_pairs(folder_of(entry), entry.get("train_split", "train")))

    def arrays(self, entry: Mapping[str, Any], split: str, size: Optional[int]) -> Tuple[Any, Any]:
        from promptmatch.datasets.folder import load_folder_split

        return load_folder_split(folder_of(entry), split, size)

    def mmseg_dataset(self, entry: Mapping[str, Any], split: str, pipeline: List[Dict[str, Any]], train: bool,
                      crop: Tuple[int, int], indices: Optional[List[int]], explicit_size: bool
                      ) -> Tuple[Dict[str, Any], Optional[Tuple[int, int]]]:
        fd = folder_of(entry)
        meta: Dict[str, Any] = {"classes": tuple(fd.classes)}
        if fd.palette:
            meta["palette"] = [list(p) for p in fd.palette]
        cfg: Dict[str, Any] = dict(type="BaseSegDataset", data_root=str(fd.root),
                                   data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"),
                                   metainfo=meta, seg_map_suffix=fd.seg_map_suffix,
                                   reduce_zero_label=fd.reduce_zero_label, pipeline=pipeline)
        suffix = fd.img_suffix
        if suffix is None:  # any of .png/.jpg/.jpeg: mmseg takes one suffix, so use the one present
            from promptmatch.datasets.folder import folder_pairs

            pairs = folder_pairs(fd, split)
            suffix = pairs[0][0].suffix if pairs else ".png"
            if len({p.suffix for p, _ in pairs}) > 1:
                raise SpecError(f"dataset {entry['name']!r}: the images of split {split!r} mix suffixes "
                                f"{sorted({p.suffix for p, _ in pairs})}; mmseg reads one: give 'img_suffix'")
        cfg["img_suffix"] = suffix
        return subset_config(cfg, indices), None
