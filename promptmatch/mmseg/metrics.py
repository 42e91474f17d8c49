"""``promptmatch.PerClassIoUMetric``: mmseg's IoU metric that also returns every class's IoU.

mmseg's ``IoUMetric`` logs a per-class table but returns only the summary (``aAcc``,
``mIoU``, ``mAcc``). This subclass returns the same summary plus ``IoU.<class name>`` for
each class, so per-class results reach the log, the visualiser backends and ``save_best``::

    val_evaluator = dict(type='promptmatch.PerClassIoUMetric', iou_metrics=['mIoU'])
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
from mmseg.evaluation import IoUMetric

from ..registry import METRICS

__all__ = ["PerClassIoUMetric"]


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric`` whose results add ``IoU.<class name>`` for every class.

    The summary keys and values are exactly mmseg's (percent, rounded to 2 decimals). The
    per-class values are in percent, rounded to 2 decimals like mmseg's per-class table; a
    class absent from both the labels and the predictions gets NaN and, as in mmseg, is left
    out of mIoU (with ``nan_to_num`` set it gets that number, which mmseg then averages into
    mIoU). Takes the arguments of ``IoUMetric``.
    """

    def compute_metrics(self, results: List) -> Dict[str, float]:
        """mmseg's summary metrics plus ``IoU.<class name>`` (percent) for each class."""
        metrics = super().compute_metrics(results)
        if self.format_only:
            return metrics
        # mmseg's own division (float32 areas from torch.histc), so the values match its table
        areas = tuple(zip(*results))
        iou = self.total_area_to_metrics(sum(areas[0]), sum(areas[1]), sum(areas[2]), sum(areas[3]),
                                         ["mIoU"], self.nan_to_num, self.beta)["IoU"]
        class_names = self.dataset_meta["classes"]
        for name, value in zip(class_names, iou):
            metrics[f"IoU.{name}"] = float(np.round(value * 100, 2))
        return metrics
