"""What input a backbone takes: image channels, patch size, a fixed image size, and the check of
a batch of images against them."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["check_images", "fixed_img_size", "input_channels", "patch_size"]


def patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The patch size input sides must be multiples of (timm PatchEmbed without padding), or None."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None or getattr(pe, "dynamic_img_pad", True):
        return None  # overlapping / padding patch embeddings (PVTv2, ...) take any size
    if isinstance(ps, int):
        return (ps, ps)
    return tuple(int(v) for v in ps)  # type: ignore[return-value]


def fixed_img_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The one input size a token model accepts, or None if it takes any size."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return None
    if getattr(model, "dynamic_img_size", False):
        return None
    if not getattr(pe, "strict_img_size", False):
        return None
    size = getattr(pe, "img_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1]))


def input_channels(model: nn.Module) -> Optional[int]:
    """Image channels ``model`` takes (its patch embedding's, its pretrained config's or its first
    convolution's), or None if it has no such clue."""
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        return proj.in_channels
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    size = pcfg.get("input_size") if isinstance(pcfg, dict) else None
    if size:
        return int(size[0])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def check_images(
    images: torch.Tensor,
    in_chans: Optional[int],
    fixed_size: Optional[Tuple[int, int]],
    patch: Optional[Tuple[int, int]],
    max_reduction: int,
) -> None:
    """Raise a clear error if ``images`` do not fit a backbone that takes ``in_chans`` channels, only
    ``fixed_size`` inputs (if not None), sides that are multiples of ``patch`` (if not None) and
    at least ``max_reduction`` (its largest stride)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got a {images.ndim}-d tensor {tuple(images.shape)}")
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(
            f"images have {images.shape[1]} channels but the backbone expects {in_chans} "
            "(pass RGB images as (N, 3, H, W))"
        )
    h, w = int(images.shape[2]), int(images.shape[3])
    if fixed_size is not None and (h, w) != fixed_size:
        raise ValueError(
            f"this backbone was built for {fixed_size[0]}x{fixed_size[1]} inputs only, got "
            f"{h}x{w}; create it with dynamic_img_size=True (promptmatch.create_backbone does) to "
            "segment crops of other sizes"
        )
    if patch is not None:
        ph, pw = patch
        if h % ph or w % pw:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}; "
                f"use crops whose sides are multiples of {ph} (e.g. {max(ph, h // ph * ph)}x{max(pw, w // pw * pw)})"
            )
    if h < max_reduction or w < max_reduction:
        raise ValueError(
            f"image size {h}x{w} is smaller than the backbone's largest stride {max_reduction}; "
            f"use images of at least {max_reduction}x{max_reduction}"
        )
