"""The data augmentation of mmseg's training recipe, in numpy, Pillow and torch (no mmcv, no cv2).

:class:`TrainAugment` applies, in mmseg's order, ``RandomResize`` (a random ratio of a target
scale, aspect kept), ``RandomCrop`` (limiting the share of one class, ``cat_max_ratio``),
``RandomFlip`` (horizontal) and ``PhotoMetricDistortion`` (brightness, contrast, saturation,
hue); :func:`eval_resize` is the recipe's test-time resize (aspect kept, labels untouched).
Images are uint8 ``(H, W, 3)`` RGB arrays and labels integer ``(H, W)`` arrays of class
indices; every random draw comes from the ``numpy.random.Generator`` passed in, so a seed
decides the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TrainAugment", "rescale_size", "resize_pair", "random_crop", "photometric_distortion", "eval_resize",
           "normalise", "recipe_scale"]

Size2 = Tuple[int, int]


def recipe_scale(crop: Size2) -> Size2:
    """The resize scale ``(long, short)`` of mmseg's recipe for a ``(h, w)`` crop: ``(4 * w, h)``
    (e.g. ``(2048, 512)`` for 512 x 512 crops)."""
    return 4 * int(crop[1]), int(crop[0])


def rescale_size(height: int, width: int, scale: Size2) -> Size2:
    """``(h, w)`` of an image resized with its aspect kept to fit ``scale`` (mmcv's rule: the long
    side at most ``max(scale)``, the short side at most ``min(scale)``, the larger factor that fits)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(image: np.ndarray, label: Optional[np.ndarray], size: Size2
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``image`` resized bilinearly and ``label`` by nearest neighbour to ``size`` ``(h, w)``."""
    if (image.shape[0], image.shape[1]) == tuple(size):
        return image, label
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    out = x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    if label is None:
        return out, None
    y = torch.from_numpy(np.ascontiguousarray(label)).to(torch.float32)[None, None]
    y = F.interpolate(y, size=tuple(size), mode="nearest")
    return out, y[0, 0].to(torch.int64).numpy()


def _crop_box(height: int, width: int, crop: Size2, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    off_h = int(rng.integers(0, max(height - crop[0], 0) + 1))
    off_w = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return off_h, min(off_h + crop[0], height), off_w, min(off_w + crop[1], width)


def random_crop(image: np.ndarray, label: np.ndarray, crop: Size2, rng: np.random.Generator,
                cat_max_ratio: float = 0.75, ignore_index: int = 255, tries: int = 10
                ) -> Tuple[np.ndarray, np.ndarray]:
    """A random ``crop`` (smaller where the image is) of the pair, as mmseg's ``RandomCrop``.

    With ``cat_max_ratio < 1`` up to ``tries`` boxes are drawn until one holds at least two
    classes and no class (ignored pixels aside) covers ``cat_max_ratio`` or more of its labelled
    pixels; the last box drawn is used when none does.
    """
    h, w = label.shape[:2]
    box = _crop_box(h, w, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y0, y1, x0, x1 = box
            values, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(h, w, crop, rng)
    y0, y1, x0, x1 = box
    return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def _scaled(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_channel(img: np.ndarray, channel: int, fn) -> np.ndarray:
    from PIL import Image

    hsv = np.array(Image.fromarray(img, "RGB").convert("HSV"))
    hsv[..., channel] = fn(hsv[..., channel])
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion``: each step with probability 1/2, in its order (brightness;
    contrast first or last; saturation; hue), every step clipped to uint8. Hue shifts are in
    OpenCV's 0..180 units (converted to Pillow's 0..255 HSV)."""
    img = image
    if rng.integers(2):
        img = _scaled(img, beta=float(rng.uniform(-brightness_delta, brightness_delta)))
    contrast_last = rng.integers(2) == 0

    def contrast(x: np.ndarray) -> np.ndarray:
        return _scaled(x, alpha=float(rng.uniform(*contrast_range))) if rng.integers(2) else x

    if not contrast_last:
        img = contrast(img)
    if rng.integers(2):
        alpha = float(rng.uniform(*saturation_range))
        img = _hsv_channel(img, 1, lambda s: _scaled(s, alpha=alpha))
    if rng.integers(2):
        shift = int(round(int(rng.integers(-hue_delta, hue_delta)) * 256 / 180))
        img = _hsv_channel(img, 0, lambda h: ((h.astype(np.int32) + shift) % 256).astype(np.uint8))
    if contrast_last:
        img = contrast(img)
    return img


@dataclass(frozen=True)
class TrainAugment:
    """The training augmentation of mmseg's recipe for ``crop`` ``(h, w)`` crops.

    Attributes:
        crop: the crop size ``(h, w)``; images smaller than it after the resize give smaller
            crops (the collate pads them, labels with the ignore index).
        scale: the resize target ``(long, short)``; default :func:`recipe_scale` of ``crop``.
        ratio_range: the random factor applied to ``scale`` (mmseg: 0.5 to 2.0).
        cat_max_ratio: the largest share one class may take of a crop (1: no limit).
        flip_prob: the probability of a horizontal flip.
        photometric: apply :func:`photometric_distortion`.
        ignore_index: the label of pixels without a class.
    """

    crop: Size2
    scale: Optional[Size2] = None
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __post_init__(self) -> None:
        crop = tuple(int(c) for c in self.crop)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop must be two positive sides (h, w), got {self.crop!r}")
        object.__setattr__(self, "crop", crop)
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range!r}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio!r}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """The augmented ``(image, label)`` pair (uint8 ``(h, w, 3)``, int64 ``(h, w)``)."""
        scale = self.scale or recipe_scale(self.crop)
        ratio = float(rng.uniform(*self.ratio_range))
        target = (int(scale[0] * ratio), int(scale[1] * ratio))
        size = rescale_size(image.shape[0], image.shape[1], target)
        image, label = resize_pair(image, label.astype(np.int64), size)
        image, label = random_crop(image, label, self.crop, rng, self.cat_max_ratio, self.ignore_index)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def eval_resize(image: np.ndarray, scale: Optional[Size2]) -> np.ndarray:
    """The image resized (aspect kept) to fit ``scale`` ``(long, short)``, as the recipe's test
    pipeline; ``None`` keeps it. Labels stay at the original size (predictions are resized back)."""
    if scale is None:
        return image
    return resize_pair(image, None, rescale_size(image.shape[0], image.shape[1], scale))[0]


def normalise(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A uint8 ``(H, W, 3)`` RGB image as a float ``(3, H, W)`` tensor normalised with ``mean``/``std``
    (0..1 scale; ImageNet's by default)."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # e.g. np.asarray of a PIL image
        image = image.copy()
    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s
