"""Class maps of images of any size and kind: the user-facing inference entry point.

:func:`predict` takes tensors, uint8 arrays, PIL images, image files, folders or lists of
them, pads every image (bottom/right, zeros after normalisation, as mmseg's ViT ``PatchEmbed``
with ``padding="corner"`` does) to a size the frozen backbone accepts, runs the model in
whole-image or sliding-window mode (:func:`promptmatch.inference.segment_logits`), crops the
logits back to the image's own size and returns class maps (optionally the logits too).
:func:`size_rule` tells what sizes a model accepts and how an image gets padded.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .constants import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD
from .inference import Size2, _pair, check_amp, segment_logits
from .staging import StagedBackbone

__all__ = ["predict", "size_rule", "SizeRule", "list_images", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES"]

_logger = logging.getLogger(__name__)

#: ``progress=None`` shows a bar for a folder input or for more images than this.
_AUTO_PROGRESS_MIN = 4

ImageInput = Any  # torch.Tensor | np.ndarray | PIL.Image.Image | str | os.PathLike | a list of them


# ----------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class SizeRule:
    """The input sizes a model accepts, and how :func:`predict` pads an image to one of them.

    Attributes:
        patch: ``(h, w)`` the input sides must be multiples of (a ViT's patch size; 1 for CNNs).
        multiple: ``(h, w)`` images are padded to multiples of: ``patch``, or its lcm with a
            caller's ``size_divisor``.
        minimum: the smallest sides the backbone takes (its largest stride, at least ``patch``).
        fixed: the only size a fixed-size token model takes, or ``None``.
    """

    patch: Tuple[int, int] = (1, 1)
    multiple: Tuple[int, int] = (1, 1)
    minimum: Tuple[int, int] = (1, 1)
    fixed: Optional[Tuple[int, int]] = None

    def padded(self, height: int, width: int, crop: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """The size an ``height`` x ``width`` image is padded to (``crop``: the sliding-window size).

        Sides grow to at least ``minimum`` and to the next multiple of ``multiple``. A fixed-size
        model gets exactly its size in whole mode (larger images raise ``ValueError``), and at
        least its size (= the crop) in slide mode.
        """
        if self.fixed is not None:
            if crop is None:
                if height > self.fixed[0] or width > self.fixed[1]:
                    raise ValueError(
                        f"this backbone takes {self.fixed[0]}x{self.fixed[1]} inputs only and the image is "
                        f"{height}x{width}; use mode='slide' with crop={self.fixed} (or build the backbone "
                        "with dynamic_img_size=True, as promptmatch.create_backbone does)"
                    )
                return self.fixed
            return max(height, self.fixed[0]), max(width, self.fixed[1])
        sides = []
        for side, low, mult in zip((height, width), self.minimum, self.multiple):
            side = max(side, low)
            sides.append(-(-side // mult) * mult)
        return sides[0], sides[1]

    def check_crop(self, crop: Tuple[int, int]) -> None:
        """Raise ``ValueError`` if sliding windows of ``crop`` cannot go through the backbone."""
        if self.fixed is not None and tuple(crop) != tuple(self.fixed):
            raise ValueError(f"this backbone takes {self.fixed[0]}x{self.fixed[1]} inputs only; use crop={self.fixed}, "
                             f"got crop={tuple(crop)}")
        if crop[0] % self.patch[0] or crop[1] % self.patch[1]:
            fit = tuple(max(p, c // p * p) for c, p in zip(crop, self.patch))
            raise ValueError(f"crop {tuple(crop)} is not a multiple of the backbone's patch size {self.patch}; "
                             f"use e.g. crop={fit}")
        if crop[0] < self.minimum[0] or crop[1] < self.minimum[1]:
            raise ValueError(f"crop {tuple(crop)} is smaller than the backbone's largest stride {self.minimum}; "
                             f"use a crop of at least {self.minimum}")


def _find_staged(model: nn.Module) -> Optional[StagedBackbone]:
    """The :class:`StagedBackbone` inside ``model`` (a PromptSegmentor's, or any staged submodule's)."""
    staged = getattr(model, "staged", None)
    if isinstance(staged, StagedBackbone):
        return staged
    for module in model.modules():
        staged = getattr(module, "_promptmatch_staged", None)
        if isinstance(staged, StagedBackbone):
            return staged
    return None


def size_rule(model: nn.Module, size_divisor: Optional[int] = None) -> SizeRule:
    """What input sizes ``model`` accepts (read from its staged backbone), as a :class:`SizeRule`.

    A model without a staged backbone accepts any size. ``size_divisor`` (e.g. 32) pads images
    further, to multiples of the lcm of it and the patch size.
    """
    if size_divisor is not None and (isinstance(size_divisor, bool) or not isinstance(size_divisor, int)
                                     or size_divisor <= 0):
        raise ValueError(f"size_divisor must be a positive int or None, got {size_divisor!r}")
    staged = _find_staged(model)
    patch: Tuple[int, int] = (1, 1)
    minimum: Tuple[int, int] = (1, 1)
    fixed: Optional[Tuple[int, int]] = None
    if staged is not None:
        if staged.patch_size is not None:
            patch = (int(staged.patch_size[0]), int(staged.patch_size[1]))
        stride = max((int(s.reduction) for s in staged.stages), default=1)
        minimum = (max(stride, patch[0]), max(stride, patch[1]))
        fixed = staged.fixed_img_size
    extra = size_divisor or 1
    multiple = (math.lcm(patch[0], extra), math.lcm(patch[1], extra))
    return SizeRule(patch=patch, multiple=multiple, minimum=minimum, fixed=fixed)


# ----------------------------------------------------------------------------------- inputs
@dataclass
class _Item:
    """One image to predict: its size, how to get it as a normalised (C, H, W) tensor, and where results go."""

    size: Tuple[int, int]
    load: Callable[[], torch.Tensor]
    out_device: torch.device


_CPU = torch.device("cpu")


def list_images(folder: Union[str, os.PathLike]) -> List[Path]:
    """Image files directly in ``folder`` (by :data:`IMAGE_SUFFIXES`, hidden files skipped), sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    return files


def _stats(values: Sequence[float], name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
    except Exception:
        raise TypeError(f"{name} must be a sequence of per-channel floats, got {values!r}") from None
    if t.numel() not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 values (RGB), got {t.numel()}")
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {values!r}")
    return t.view(-1, 1, 1)


def _raw_chw(hwc: np.ndarray, what: str) -> torch.Tensor:
    """A uint8 (H, W, 3) / (H, W) array as a uint8 (3, H, W) tensor."""
    if hwc.ndim == 2:
        hwc = np.repeat(hwc[:, :, None], 3, axis=2)
    if hwc.ndim != 3 or hwc.shape[2] != 3:
        raise ValueError(f"{what} must be a uint8 RGB array (H, W, 3) or grayscale (H, W), got shape {hwc.shape}")
    hwc = np.ascontiguousarray(hwc)
    if not hwc.flags.writeable:  # np.asarray of a PIL image is read-only
        hwc = hwc.copy()
    return torch.from_numpy(hwc).permute(2, 0, 1)


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{str(path)!r} is not an image file PIL can read") from None


def _expand(obj: ImageInput, mean: torch.Tensor, std: torch.Tensor, items: List[_Item], top: bool) -> Tuple[str, bool]:
    """Append the images of ``obj`` to ``items``; return the input's kind and whether it has a folder.

    Kinds: ``"single"`` (one image), ``"batch"`` (a 4-D tensor or array), ``"list"`` (a folder or list).
    """
    def raw(chw_u8: torch.Tensor) -> torch.Tensor:
        return (chw_u8.float().div_(255) - mean) / std

    if isinstance(obj, torch.Tensor):
        if obj.ndim not in (3, 4):
            raise ValueError(f"an image tensor must be (C, H, W) or (N, C, H, W), got shape {tuple(obj.shape)}")
        if not (obj.is_floating_point() or obj.dtype == torch.uint8):
            raise TypeError(f"image tensors must be float (normalised) or uint8 (raw, C x H x W), got {obj.dtype}")
        batch = obj if obj.ndim == 4 else obj[None]
        for img in batch:
            if img.dtype == torch.uint8:
                items.append(_Item((img.shape[-2], img.shape[-1]), lambda img=img: raw(img.cpu()), obj.device))
            else:
                items.append(_Item((img.shape[-2], img.shape[-1]), lambda img=img: img, obj.device))
        return ("batch" if obj.ndim == 4 else "single"), False
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (H, W, 3), got dtype {obj.dtype}; pass float images as an "
                            "already normalised torch tensor (C, H, W)")
        if obj.ndim == 4:
            for a in obj:
                chw = _raw_chw(a, "each image of an (N, H, W, 3) array")
                items.append(_Item((chw.shape[1], chw.shape[2]), lambda chw=chw: raw(chw), _CPU))
            return "batch", False
        chw = _raw_chw(obj, "an image array")
        items.append(_Item((chw.shape[1], chw.shape[2]), lambda chw=chw: raw(chw), _CPU))
        return "single", False
    if _is_pil(obj):
        rgb = obj.convert("RGB")
        items.append(_Item((rgb.height, rgb.width), lambda rgb=rgb: raw(_raw_chw(np.asarray(rgb), "image")), _CPU))
        return "single", False
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such image file or folder: {str(path)!r}")
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise ValueError(f"folder {str(path)!r} has no image files (looked for {sorted(IMAGE_SUFFIXES)})")
            for f in files:
                _add_file(f, raw, items)
            return "list", True
        _add_file(path, raw, items)
        return "single", False
    if isinstance(obj, (list, tuple)) and top:
        if not obj:
            raise ValueError("got an empty list of images: nothing to predict")
        folder = False
        for o in obj:
            folder = _expand(o, mean, std, items, top=False)[1] or folder
        return "list", folder
    kinds = ("a float (normalised) or uint8 torch tensor (C, H, W) / (N, C, H, W), a uint8 numpy array "
             "(H, W, 3) / (N, H, W, 3), a PIL image, a path to an image file or folder")
    if isinstance(obj, (list, tuple)):
        raise TypeError(f"lists of images cannot nest; items must be {kinds}")
    raise TypeError(f"unsupported image input {type(obj).__name__}: give {kinds}, or a list of these")


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with the install
        return False
    return isinstance(obj, Image.Image)


def _add_file(path: Path, raw: Callable[[torch.Tensor], torch.Tensor], items: List[_Item]) -> None:
    """An image file as an item; only its header is read now, its pixels when it is predicted."""
    with _open_image(path) as im:
        size = (im.height, im.width)

    def load() -> torch.Tensor:
        with _open_image(path) as im:
            return raw(_raw_chw(np.asarray(im.convert("RGB")), str(path)))

    items.append(_Item(size, load, _CPU))


# ---------------------------------------------------------------------------------- running
class _EvalMode:
    """Put every submodule in eval mode and restore each one's own train/eval flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: List[Tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


def _pad(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``img`` (C, H, W) zero-padded at the bottom and right to ``size``."""
    dh, dw = size[0] - img.shape[-2], size[1] - img.shape[-1]
    return F.pad(img, (0, dw, 0, dh)) if dh or dw else img


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, Optional[torch.dtype]]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    for b in model.buffers():
        return b.device, None
    return _CPU, None


def predict(
    model: nn.Module,
    images: ImageInput,
    mode: str = "whole",
    crop: Optional[Size2] = None,
    stride: Optional[Size2] = None,
    batch: int = 1,
    flip: bool = False,
    return_logits: bool = False,
    amp: Optional[str] = None,
    channels_last: bool = False,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    progress: Optional[bool] = None,
    device: Optional[Union[str, torch.device]] = None,
    size_divisor: Optional[int] = None,
):
    """Class maps of ``images`` predicted by a segmentor (``model(x)`` -> logits (N, K, H, W)).

    Args:
        model: a :class:`~promptmatch.PromptSegmentor` (or any model returning logits at the
            input size). It is in eval mode during prediction; every submodule's train/eval
            flag is restored afterwards.
        images: a float tensor (C, H, W) / (N, C, H, W), taken as **already normalised** (``mean``
            and ``std`` are not applied); a uint8 tensor (C, H, W) / (N, C, H, W) or uint8 numpy
            array (H, W, 3) / (N, H, W, 3) (grayscale (H, W) too), a PIL image, a path to an
            image file or a folder (its image files, sorted by name, not recursive), all taken as
            raw RGB and normalised with ``mean``/``std``; or a list of these (sizes may differ;
            folders and batches in it expand in place).
        mode, crop, stride: ``"whole"`` (one pass per image) or ``"slide"`` (mmseg sliding
            windows of ``crop`` every ``stride``), see :func:`promptmatch.inference.segment_logits`.
        batch: at most this many images, of the same padded size, go through the model at once.
        flip: horizontal-flip test-time augmentation: the logits are the mean of the image's and
            the horizontally flipped logits of the flipped image (padded on its right side too).
        return_logits: also return the float32 logits (K, H, W) per image.
        amp: ``"bf16"`` (or ``"fp16"`` on CUDA) autocast; ``channels_last``: channels-last inputs.
        mean, std: per-channel statistics on the 0..1 scale for raw inputs; default: the
            model's ``input_normalisation`` (a :class:`~promptmatch.PromptSegmentor`'s: its
            backbone's pretrained statistics, or what its loaded checkpoint recorded), else ImageNet's.
        progress: show a tqdm bar; ``None``: for a folder input or more than 4 images.
        device: where to run; the model is moved there in place. Default: the model's device.
        size_divisor: also pad sides to multiples of this (e.g. 32); default: only what the
            backbone requires.

    Every image is zero-padded at the bottom and right (zeros after normalisation, as mmseg's
    ViT ``PatchEmbed(padding="corner")``) to the next size the backbone takes (see
    :func:`size_rule`: multiples of the patch size, at least the largest stride, exactly the
    size of a fixed-size ViT), and the logits are cropped back to the image's size.

    Returns:
        For one image (a 3-D tensor, an (H, W, 3) array, a PIL image, a file): a class map
        ``LongTensor (H, W)``. For a 4-D tensor or array: ``(N, H, W)``. For a folder or a
        list: a list of ``(H, W)`` maps in input order. With ``return_logits`` a pair
        ``(classes, logits)`` of the same structure (logits (K, H, W), (N, K, H, W) or a list).
        Results lie on the input tensor's device for tensor inputs, on the CPU otherwise.

    Raises:
        TypeError: an unsupported input kind. FileNotFoundError: a path that does not exist.
        ValueError: an empty folder or list, a crop the backbone cannot take, an image too large
        for a fixed-size backbone in whole mode, a bad mode/crop/stride/amp, or a model whose
        logits are not at its input size (the last three from ``segment_logits``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    rule = size_rule(model, size_divisor)
    crop_hw: Optional[Tuple[int, int]] = None
    if mode == "slide" and crop is not None:
        crop_hw = _pair(crop, "crop")
        rule.check_crop(crop_hw)
    if device is None:
        run_device, dtype = _model_device_dtype(model)
    else:
        run_device = torch.device(device)
        model.to(run_device)
        dtype = _model_device_dtype(model)[1]
    check_amp(amp, run_device.type)  # before any image is read
    own_mean, own_std = getattr(model, "input_normalisation", None) or (IMAGENET_MEAN, IMAGENET_STD)
    mean_t = _stats(own_mean if mean is None else mean, "mean")
    std_t = _stats(own_std if std is None else std, "std")

    items: List[_Item] = []
    kind, has_folder = _expand(images, mean_t, std_t, items, top=True)
    n = len(items)
    padded = [rule.padded(*it.size, crop=crop_hw if mode == "slide" else None) for it in items]
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, size in enumerate(padded):
        groups.setdefault(size, []).append(i)
    chunks = [idx[j:j + batch] for idx in groups.values() for j in range(0, len(idx), batch)]
    _logger.debug("predicting %d image(s) in %d chunk(s), %s", n, len(chunks), rule)
    num_classes = getattr(model, "num_classes", None)
    num_classes = num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else None
    show = progress if progress is not None else (has_folder or n > _AUTO_PROGRESS_MIN)

    def run(x: torch.Tensor) -> torch.Tensor:
        return segment_logits(model, x, mode=mode, crop=crop, stride=stride, num_classes=num_classes,
                              amp=amp, channels_last=channels_last)

    classes: List[Optional[torch.Tensor]] = [None] * n
    logits: List[Optional[torch.Tensor]] = [None] * n
    from tqdm.auto import tqdm

    with _EvalMode(model), torch.no_grad(), tqdm(total=n, desc="predict", unit="img", disable=not show) as bar:
        for chunk in chunks:
            size = padded[chunk[0]]
            imgs = []
            for i in chunk:
                img = items[i].load().to(run_device)
                imgs.append(img.to(dtype) if dtype is not None and img.dtype != dtype else img)
            out = run(torch.stack([_pad(img, size) for img in imgs]))
            if flip:
                out_f = run(torch.stack([_pad(img.flip(-1), size) for img in imgs]))
            for k, i in enumerate(chunk):
                h, w = items[i].size
                lg = out[k, :, :h, :w]
                if flip:
                    lg = (lg + out_f[k, :, :h, :w].flip(-1)) / 2
                lg = lg.to(items[i].out_device)
                classes[i] = lg.argmax(0)
                if return_logits:
                    logits[i] = lg
            bar.update(len(chunk))

    if kind == "single":
        return (classes[0], logits[0]) if return_logits else classes[0]
    if kind == "batch":
        cls = torch.stack(classes)  # type: ignore[arg-type]
        return (cls, torch.stack(logits)) if return_logits else cls  # type: ignore[arg-type]
    return (classes, logits) if return_logits else classes
