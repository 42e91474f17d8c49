"""The folder engine: train and evaluate promptmatch's own segmentor on an image/mask folder
through mmengine's Runner, without mmcv or mmsegmentation.

- :mod:`.transforms`: mmseg's training augmentation (random resize in a ratio range, random
  crop limiting one class's share, flip, photometric distortion) and test-time resize, in
  numpy/Pillow/torch.
- :mod:`.data`: :class:`FolderSegDataset`, a streaming dataset over one split, and
  :class:`SegCollate`.
- :mod:`.model`: :class:`SegmentorModel`, the segmentor as an mmengine ``BaseModel`` (its own
  loss, a divergence-guarded train step, whole/sliding-window evaluation through
  :func:`promptmatch.predict`), the DDP wrapper and the optimiser wrappers (AMP).
- :mod:`.metric`: :class:`IoUMetric` (per-class IoU, mIoU, mAcc, aAcc).
- :mod:`.hooks`: progress bar with ETA, step timing, validation metrics.
- :mod:`.runner`: :class:`FolderTrainConfig`, :func:`build_runner`, :func:`train_folder`,
  :func:`evaluate_folder`.

Importing this package imports mmengine (pure Python) and never mmcv or mmseg.
"""
from __future__ import annotations

from .data import FolderSegDataset, SegCollate
from .metric import IoUMetric, iou_from_areas
from .model import SegmentorModel, build_optim_wrapper
from .runner import (
    MERGED_FILE,
    METRICS_FILE,
    PROMPTS_FILE,
    FolderTrainConfig,
    build_runner,
    build_segmentor,
    evaluate_folder,
    train_folder,
)
from .transforms import TrainAugment, eval_resize, normalise, random_crop, recipe_scale, rescale_size

__all__ = [
    "FolderSegDataset", "SegCollate", "IoUMetric", "iou_from_areas", "SegmentorModel", "build_optim_wrapper",
    "FolderTrainConfig", "build_runner", "build_segmentor", "evaluate_folder", "train_folder", "TrainAugment",
    "eval_resize", "normalise", "random_crop", "recipe_scale", "rescale_size", "PROMPTS_FILE", "MERGED_FILE",
    "METRICS_FILE",
]
