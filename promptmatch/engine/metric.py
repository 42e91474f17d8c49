"""Per-class IoU, mIoU, mean accuracy and pixel accuracy as an mmengine ``BaseMetric``."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric

from ..training import confusion_matrix

__all__ = ["IoUMetric", "iou_from_areas"]


def iou_from_areas(intersect: np.ndarray, pred_area: np.ndarray, label_area: np.ndarray,
                   class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """mIoU, mAcc, aAcc (fractions 0..1) and ``IoU.<class>`` from per-class pixel counts.

    A class that occurs neither in the labels nor in the predictions has IoU ``nan`` and is
    left out of the mean (as :func:`promptmatch.training.mean_iou` and mmseg do); ``aAcc`` is
    the share of labelled pixels predicted right. Pixels with the ignore index count nowhere.
    """
    inter = intersect.astype(np.float64)
    union = pred_area.astype(np.float64) + label_area.astype(np.float64) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
        acc = np.where(label_area > 0, inter / np.where(label_area > 0, label_area, 1), np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(inter))]
    labelled = float(label_area.sum())
    out: Dict[str, float] = {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan,
        "aAcc": float(inter.sum() / labelled) if labelled > 0 else math.nan,
    }
    out.update({f"IoU.{n}": float(v) for n, v in zip(names, iou)})
    return out


class IoUMetric(BaseMetric):
    """Semantic-segmentation IoU over a split, gathered across processes by mmengine.

    ``process`` takes the model's predictions: dicts with ``pred`` and ``label`` (integer
    ``(H, W)`` tensors of the same size); pixels labelled ``ignore_index`` are left out.
    ``compute_metrics`` returns ``mIoU``, ``mAcc``, ``aAcc`` and ``IoU.<class>`` as fractions
    (0..1); the IoU of a class absent from labels and predictions is ``nan``.
    """

    default_prefix: Optional[str] = ""  # metric names as they are ("mIoU"), and no warning about it

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Optional[Sequence[str]] = None,
                 collect_device: str = "cpu", prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else None

    def process(self, data_batch: Any, data_samples: Sequence[Dict[str, torch.Tensor]]) -> None:
        """Count, per sample, the pixels of each class that are predicted right, predicted and labelled."""
        k = self.num_classes
        for sample in data_samples:
            pred, label = sample["pred"].flatten().long(), sample["label"].flatten().long().to(sample["pred"].device)
            if pred.shape != label.shape:
                raise ValueError(f"prediction and label differ in size ({tuple(sample['pred'].shape)} vs "
                                 f"{tuple(sample['label'].shape)})")
            conf = confusion_matrix(pred, label, k, self.ignore_index).cpu()
            self.results.append({"intersect": conf.diag().numpy(), "pred_area": conf.sum(0).numpy(),
                                 "label_area": conf.sum(1).numpy()})

    def compute_metrics(self, results: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
        """The metrics of the whole split from every sample's counts."""
        k = self.num_classes
        sums = {key: np.zeros(k, dtype=np.int64) for key in ("intersect", "pred_area", "label_area")}
        for r in results:
            for key in sums:
                sums[key] += np.asarray(r[key], dtype=np.int64)
        return iou_from_areas(sums["intersect"], sums["pred_area"], sums["label_area"], self.class_names)
