"""Loading one split of a folder dataset as numpy arrays (:func:`load_folder_split`)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .check import (
    _bad_label_values,
    _channels_detail,
    _describe_exc,
    _format_issues,
    _Issue,
    _map_labels,
    _mask_array,
    _rel,
    _single_channel,
    _size_str,
    folder_pairs,
    sizes_listing,
)
from .layout import FolderDataset, FolderDatasetError

__all__ = ["load_folder_split"]


def load_folder_split(ds: FolderDataset, split: str, size: Optional[int] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """All images and labels of one split as arrays, in stem order.

    Args:
        ds: the dataset.
        split: the split folder.
        size: resize every image and mask to ``size x size`` (images bilinear, masks nearest);
            None: keep the sizes, which must then all be equal.

    Returns:
        ``(images, labels)``: uint8 arrays of shape ``(N, H, W, 3)`` (RGB) and ``(N, H, W)``
        (class indices or ``ds.ignore_index``, after the ``reduce_zero_label`` rule).

    Raises:
        FolderDatasetError: the split's files do not pair up (see :func:`folder_pairs`), a
            file cannot be read, a mask is not single-channel, differs in size from its image
            or holds values that are not labels, or (``size`` None) the images differ in size.
    """
    from PIL import Image

    if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    pairs = folder_pairs(ds, split)
    issues: List[_Issue] = []
    images: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    sizes: Dict[Tuple[int, int], List[str]] = {}
    for img_path, mask_path in pairs:
        img_w, img_name = _rel(img_path, ds, split, "img_dir")
        ann_w, ann_name = _rel(mask_path, ds, split, "ann_dir")
        rgb = raw = None
        try:
            with Image.open(img_path) as im:
                rgb = im.convert("RGB")
        except Exception as exc:  # anything PIL raises on a broken file
            issues.append(_Issue("unreadable_img", img_w, img_name, _describe_exc(exc, img_path)))
        try:
            with Image.open(mask_path) as im:
                if _single_channel(im):
                    raw = _mask_array(im)
                else:
                    issues.append(_Issue("channels", ann_w, ann_name, _channels_detail(im)))
        except Exception as exc:  # anything PIL raises on a broken file
            issues.append(_Issue("unreadable_mask", ann_w, ann_name, _describe_exc(exc, mask_path)))
        if rgb is None or raw is None:
            continue
        if (raw.shape[1], raw.shape[0]) != rgb.size:
            issues.append(_Issue("size", ann_w, ann_name, f"mask {_size_str((raw.shape[1], raw.shape[0]))}, "
                                                          f"image {_size_str(rgb.size)}"))
            continue
        bad = _bad_label_values(raw, ds)
        if bad:
            issues.append(_Issue("labels", ann_w, ann_name, f"values {', '.join(map(str, bad[:10]))}",
                                 tuple(bad)))
            continue
        label = Image.fromarray(_map_labels(raw, ds).astype(np.uint8))
        if size is not None:
            rgb = rgb.resize((int(size), int(size)), Image.Resampling.BILINEAR)
            label = label.resize((int(size), int(size)), Image.Resampling.NEAREST)
        sizes.setdefault(rgb.size, []).append(img_name)
        images.append(np.asarray(rgb, dtype=np.uint8))
        labels.append(np.asarray(label, dtype=np.uint8))
    if issues:
        raise FolderDatasetError(_format_issues(issues, ds, 5), ds.root)
    if len(sizes) > 1:
        raise FolderDatasetError(
            [f"img_dir/{split}: the images have {len(sizes)} different sizes: {sizes_listing(sizes)}; pass "
             f"size=<side> to resize every image to side x side"], ds.root)
    return np.stack(images), np.stack(labels)
