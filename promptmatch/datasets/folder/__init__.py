"""User-supplied semantic-segmentation datasets stored as image/mask folders (mmseg layout).

The layout is the one mmsegmentation's ``BaseSegDataset`` reads::

    <root>/img_dir/<split>/<stem><img_suffix>       images (any mode; read as RGB)
    <root>/ann_dir/<split>/<stem><seg_map_suffix>   single-channel masks: class index per pixel,
                                                    255 = ignore
    <root>/classes.json or <root>/classes.txt       class names (optional: may be passed in)

Stems may contain sub-folders (``img_dir/train/city_a/0001.png`` pairs with
``ann_dir/train/city_a/0001.png``), as in mmseg. Files and folders whose name starts with a
dot are ignored. With ``reduce_zero_label=True`` mask value 0 means "ignore" and value ``v``
means class ``v - 1`` (mmseg's rule); the ignore value itself stays "ignore".

- :func:`describe_folder_dataset`: a :class:`FolderDataset` (root, classes, palette, splits,
  suffixes) from arguments or the classes file.
- :func:`check_folder_dataset`: every problem of the data on disk (missing folders, unmatched
  or unreadable files, size mismatches, colour masks, out-of-range labels), all reported in
  one :class:`FolderDatasetError`.
- :func:`folder_pairs`: the ``(image, mask)`` files of one split.
- :func:`folder_image_sizes`: the image sizes of one split, from the file headers.
- :func:`load_folder_split`: one split as numpy arrays (for small in-memory benchmarks).
- :func:`export_offline_as_folder`: write a built-in offline dataset in this layout (one
  writer, :func:`write_folder_dataset`, for it and ``render_offline_as_folder``).

Modules: :mod:`.layout` (the description), :mod:`.check` (the checks), :mod:`.load` (arrays),
:mod:`.writer` (writing a folder dataset). Only numpy, Pillow and the standard library are
used; Pillow and tqdm are imported when needed.
"""
from __future__ import annotations

from ..offline.export import export_offline_as_folder
from .check import check_folder_dataset, folder_image_sizes, folder_pairs
from .layout import FolderDataset, FolderDatasetError, describe_folder_dataset
from .load import load_folder_split
from .writer import write_folder_dataset

__all__ = [
    "FolderDataset",
    "FolderDatasetError",
    "check_folder_dataset",
    "describe_folder_dataset",
    "export_offline_as_folder",
    "folder_image_sizes",
    "folder_pairs",
    "load_folder_split",
    "write_folder_dataset",
]
