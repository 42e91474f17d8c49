"""Segmentation logits of whole images: one forward pass or mmseg-style sliding windows.

:func:`segment_logits` is the inference path shared by :func:`promptmatch.training.evaluate_segmentor`
and callers with their own loop. ``mode="slide"`` reproduces mmseg 1.x's
``EncoderDecoder.slide_inference`` window grid and averaging exactly; both modes can run under
bf16/fp16 autocast and on channels-last inputs.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["segment_logits", "slide_windows", "autocast_context", "AMP_DTYPES"]

#: The accepted ``amp`` names and the autocast dtype each one selects.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Size2 = Union[int, Tuple[int, int]]


def _pair(value: Size2, name: str) -> Tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of positive ints (an int means a square)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}") from None
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
            raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair  # type: ignore[return-value]


def check_amp(amp: Optional[str], device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype that ``amp`` names on ``device_type`` (``None`` for no autocast).

    Raises ``ValueError`` for an unknown name, and for ``"fp16"`` anywhere but CUDA.
    """
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device_type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (got device type {device_type!r}); "
                         "use amp='bf16' or None on this device")
    return AMP_DTYPES[amp]


def autocast_context(amp: Optional[str], device_type: str) -> ContextManager[None]:
    """``torch.autocast`` on ``device_type`` with the dtype ``amp`` names, or a no-op for ``None``."""
    dtype = check_amp(amp, device_type)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def slide_windows(height: int, width: int, crop: Size2, stride: Size2) -> Iterator[Tuple[int, int, int, int]]:
    """The ``(y1, y2, x1, x2)`` windows mmseg's ``slide_inference`` visits, in its order.

    A window is ``crop`` wide unless the image is smaller; the last row/column of windows is
    shifted back so it ends at the image border.
    """
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    _check_stride(crop_h, crop_w, stride_h, stride_w, crop, stride)
    h_grids = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * stride_h + crop_h, height)
            x2 = min(w_idx * stride_w + crop_w, width)
            yield max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2


def _check_stride(crop_h: int, crop_w: int, stride_h: int, stride_w: int, crop: Size2, stride: Size2) -> None:
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {stride!r} is larger than crop {crop!r}: sliding windows would leave "
                         "pixels uncovered; use a stride <= the crop size")


def _check_logits(out: torch.Tensor, n: int, size: Tuple[int, int], num_classes: Optional[int], what: str) -> None:
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits (N, K, H, W) for {what}, got {shape}")
    if out.shape[0] != n or tuple(out.shape[-2:]) != tuple(size):
        raise ValueError(f"the model returned logits {tuple(out.shape)} for {what} of {n} image(s) of size "
                         f"{tuple(size)}: logits must be at the input resolution")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"the model returned {out.shape[1]} classes for {what}, expected num_classes={num_classes}")


def segment_logits(
    model: nn.Module,
    images: torch.Tensor,
    mode: str = "whole",
    crop: Optional[Size2] = None,
    stride: Optional[Size2] = None,
    num_classes: Optional[int] = None,
    amp: Optional[str] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Float32 class logits ``(N, K, H, W)`` of ``images`` ``(N, C, H, W)`` at their own size.

    ``mode="whole"`` is one forward pass. ``mode="slide"`` runs the model on ``crop``-sized
    windows ``stride`` apart (ints mean squares) with mmseg 1.x's ``slide_inference``
    semantics: windows that would cross the border are shifted back inside it (an image
    smaller than ``crop`` is one window), and every pixel's logits are the mean over the
    windows covering it. ``num_classes``, when given, is checked against the model's output.

    ``amp`` (``"bf16"``, or ``"fp16"`` on CUDA only) runs the model under ``torch.autocast``
    on the images' device; ``channels_last`` passes the images in channels-last memory format
    (convert the model yourself). Runs under ``torch.no_grad()``; the model's train/eval mode
    is left to the caller.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {shape}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "whole" and (crop is not None or stride is not None):
        raise ValueError("crop and stride apply only to mode='slide'; got them with mode='whole'")
    if mode == "slide":
        if crop is None or stride is None:
            raise ValueError(f"mode='slide' needs both crop and stride, got crop={crop!r}, stride={stride!r}")
        crop_hw, stride_hw = _pair(crop, "crop"), _pair(stride, "stride")
        _check_stride(*crop_hw, *stride_hw, crop, stride)
    ctx = autocast_context(amp, images.device.type)  # validates amp before any work
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    n, _, height, width = images.shape
    with torch.no_grad():
        if mode == "whole":
            with ctx:
                out = model(images)
            _check_logits(out, n, (height, width), num_classes, "the images")
            return out.float()
        total: Optional[torch.Tensor] = None
        count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=images.device)
        windows: List[Tuple[int, int, int, int]] = list(slide_windows(height, width, crop_hw, stride_hw))
        for y1, y2, x1, x2 in windows:
            with autocast_context(amp, images.device.type):
                out = model(images[:, :, y1:y2, x1:x2])
            _check_logits(out, n, (y2 - y1, x2 - x1), num_classes, f"window [{y1}:{y2}, {x1}:{x2}]")
            if total is None:
                total = out.new_zeros((n, out.shape[1], height, width), dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += out.float()
            count[:, :, y1:y2, x1:x2] += 1
        assert total is not None and bool((count > 0).all())  # stride <= crop covers every pixel
        return total / count
