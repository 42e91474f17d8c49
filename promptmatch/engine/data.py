"""A streaming dataset over one split of a folder dataset, and the collate mmengine's Runner uses.

:class:`FolderSegDataset` reads each image and mask when it is asked for (nothing is held in
memory), pairs them by :func:`promptmatch.datasets.folder.folder_pairs`, maps mask values by
the dataset's ``reduce_zero_label`` rule, and augments (training) or resizes (evaluation) them.
:class:`SegCollate` stacks training crops, padded to the crop size (image zeros after
normalisation, labels the ignore index, as mmseg's data preprocessor), or keeps evaluation
images of different sizes as lists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..datasets.folder import FolderDataset, FolderDatasetError, folder_pairs
from ..datasets.folder.check import _bad_label_values, _map_labels, _mask_array, _single_channel
from .transforms import Size2, TrainAugment, eval_resize, normalise

__all__ = ["FolderSegDataset", "SegCollate"]


class FolderSegDataset(Dataset):
    """One split of a folder dataset, read lazily.

    Args:
        folder: the dataset (:func:`promptmatch.datasets.folder.describe_folder_dataset`).
        split: the split folder under ``img_dir/`` and ``ann_dir/``.
        augment: the training augmentation; ``None`` for evaluation.
        eval_scale: evaluation only: resize images (aspect kept) to fit ``(long, short)``, as
            mmseg's test pipeline; labels keep the original size. ``None``: original size.
        indices: only these samples (positions in stem order), e.g. a held-out part.
        seed: the augmentation's random seed; each DataLoader worker (and each process of a
            distributed run) draws from its own stream derived from it.
        normalisation: ``(mean, std)`` on the 0..1 scale (a segmentor's ``input_normalisation``);
            default ImageNet's.

    Items are dicts: ``inputs`` (normalised float ``(3, h, w)``), ``labels`` (int64 ``(H, W)``,
    the ignore index where there is no class) and ``metas`` (file names and original size).
    A file that cannot be read, or a mask with values that are not labels, raises
    :class:`~promptmatch.datasets.folder.FolderDatasetError` naming the file.
    """

    def __init__(self, folder: FolderDataset, split: str, augment: Optional[TrainAugment] = None,
                 eval_scale: Optional[Size2] = None, indices: Optional[Sequence[int]] = None, seed: int = 0,
                 normalisation: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> None:
        self.folder = folder
        self.normalisation = tuple(normalisation) if normalisation is not None else (IMAGENET_MEAN, IMAGENET_STD)
        self.split = split
        self.augment = augment
        self.eval_scale = tuple(eval_scale) if eval_scale is not None else None
        pairs = folder_pairs(folder, split)
        if indices is not None:
            bad = [i for i in indices if not 0 <= int(i) < len(pairs)]
            if bad:
                raise IndexError(f"indices {bad[:5]} are outside the {len(pairs)} samples of split {split!r}")
            pairs = [pairs[int(i)] for i in indices]
        if not pairs:
            raise FolderDatasetError([f"split {split!r} has no samples to use"], folder.root)
        self.pairs: List[Tuple[Path, Path]] = pairs
        self.seed = int(seed)
        self._rng: Optional[np.random.Generator] = None
        self._rng_owner: Optional[Tuple[int, int]] = None

    @property
    def metainfo(self) -> Dict[str, Any]:
        """Class names and palette (what mmengine stores in its checkpoints' meta)."""
        return {"classes": tuple(self.folder.classes),
                "palette": [list(c) for c in self.folder.palette] if self.folder.palette else None}

    def __len__(self) -> int:
        return len(self.pairs)

    def rng(self) -> np.random.Generator:
        """This process's (and DataLoader worker's) augmentation random stream."""
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), info.id if info is not None else -1)
        if self._rng is None or self._rng_owner != owner:
            rank = int(os.environ.get("RANK", "0") or 0)
            self._rng = np.random.default_rng([self.seed, rank, owner[1] + 1])
            self._rng_owner = owner
        return self._rng

    def read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw pair ``index``: uint8 RGB ``(H, W, 3)`` and int64 labels ``(H, W)`` after the
        ``reduce_zero_label`` rule."""
        from PIL import Image

        img_path, mask_path = self.pairs[index]
        ds = self.folder
        try:
            with Image.open(img_path) as im:
                image = np.array(im.convert("RGB"))  # a writable copy
        except Exception as exc:  # anything PIL raises on a broken file
            raise FolderDatasetError([f"image {img_path} cannot be read ({type(exc).__name__}: {exc}); replace it "
                                      "with a valid PNG/JPEG or remove it with its mask"], ds.root) from None
        try:
            with Image.open(mask_path) as im:
                if not _single_channel(im):
                    raise ValueError(f"mode {im.mode} is not a single-channel class-index image")
                raw = _mask_array(im)
        except Exception as exc:  # anything PIL raises on a broken file
            raise FolderDatasetError([f"mask {mask_path} cannot be read as a class-index image "
                                      f"({type(exc).__name__}: {exc}); re-export it as a class-index PNG"],
                                     ds.root) from None
        if raw.shape != image.shape[:2]:
            raise FolderDatasetError([f"mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} but its image is "
                                      f"{image.shape[1]}x{image.shape[0]}; resize the mask (nearest neighbour)"],
                                     ds.root)
        bad = _bad_label_values(raw, ds)
        if bad:
            raise FolderDatasetError([f"mask {mask_path} holds values {bad[:10]} that are neither class indices "
                                      f"0..{ds.num_classes - 1} nor the ignore value {ds.ignore_index}"], ds.root)
        return image, _map_labels(raw, ds)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image, label = self.read(index)
        ori = (int(label.shape[0]), int(label.shape[1]))
        if self.augment is not None:
            image, label = self.augment(image, label, self.rng())
        else:
            image = eval_resize(image, self.eval_scale)
        img_path, mask_path = self.pairs[index]
        return {"inputs": normalise(image, *self.normalisation), "labels": torch.from_numpy(np.ascontiguousarray(label)).long(),
                "metas": {"img_path": str(img_path), "seg_map_path": str(mask_path), "ori_size": ori}}


@dataclass(frozen=True)
class SegCollate:
    """Batches items of :class:`FolderSegDataset` for mmengine's Runner.

    ``pad_to`` (training): stack images and labels, padded at the bottom/right to at least
    ``pad_to`` ``(h, w)`` and to the largest item (images with zeros, labels with
    ``ignore_index``). ``None`` (evaluation): keep ``inputs`` and ``labels`` as lists.
    """

    pad_to: Optional[Size2] = None
    ignore_index: int = 255

    def __call__(self, items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        inputs = [it["inputs"] for it in items]
        labels = [it["labels"] for it in items]
        metas = [it["metas"] for it in items]
        if self.pad_to is None:
            return {"inputs": inputs, "labels": labels, "metas": metas}
        h = max([self.pad_to[0]] + [x.shape[-2] for x in inputs])
        w = max([self.pad_to[1]] + [x.shape[-1] for x in inputs])
        xs = [F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), value=0.0) for x in inputs]
        ys = [F.pad(y, (0, w - y.shape[-1], 0, h - y.shape[-2]), value=self.ignore_index) for y in labels]
        return {"inputs": torch.stack(xs), "labels": torch.stack(ys), "metas": metas}
