"""Layouts of stage outputs: tokens (N, L, C) or maps (N, C, H, W) / (N, H, W, C), and their
NCHW view."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from ._stages import Stage

__all__ = ["map_layout", "map_dims", "to_map", "token_stride"]

MAX_PREFIX_TOKENS = 16  # class, register (and prompt) tokens that may precede the patch tokens


def map_layout(out: torch.Tensor, channels: int, native_fmt: str) -> str:
    """``'NLC'`` for a 3-d tensor (tokens), ``'NCHW'`` or ``'NHWC'`` for a 4-d map.

    A map is NCHW if only its second dim equals ``channels``, NHWC if only its last does; when
    that does not tell (``channels`` unknown, i.e. 0, or both match) the model's ``native_fmt``
    (timm's ``output_fmt``) decides.
    """
    if out.ndim == 3:
        return "NLC"
    if out.ndim != 4:
        raise ValueError(f"expected tokens (N, L, C) or a map, got a {out.ndim}-d tensor")
    if channels > 0:
        first, last = out.shape[1] == channels, out.shape[3] == channels
        if first and not last:
            return "NCHW"
        if last and not first:
            return "NHWC"
    return "NHWC" if native_fmt == "NHWC" else "NCHW"


def map_dims(out: torch.Tensor, layout: str) -> Tuple[int, int, int]:
    """``(channels, height, width)`` of a 4-d map in ``layout`` ('NCHW' or 'NHWC')."""
    if layout == "NHWC":
        return int(out.shape[3]), int(out.shape[1]), int(out.shape[2])
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def token_stride(length: int, size: Tuple[int, int]) -> int:
    """Stride of a token sequence of ``length`` for an input of ``size`` (after up to 16 prefix tokens)."""
    h, w = size
    for prefix in range(0, MAX_PREFIX_TOKENS + 1):
        n = length - prefix
        if n <= 0:
            break
        r = round((h * w / n) ** 0.5)
        if r >= 1 and -(-h // r) * -(-w // r) == n:
            return r
    raise ValueError(f"cannot tell the stride of {length} tokens for a {h}x{w} input")


def to_map(
    out: torch.Tensor, layout: str, stage: Stage, height: int, width: int
) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """NCHW view of a stage's output for a ``height`` x ``width`` input, and a function that turns
    an NCHW map of the same shape back into the output's layout.

    Tokens are laid on the patch grid of the stage's stride; prefix tokens (class, registers)
    are kept aside and put back in front.
    """
    if layout == "NCHW":
        return out, lambda m: m
    if layout == "NHWC":
        return out.permute(0, 3, 1, 2), lambda m: m.permute(0, 2, 3, 1)
    red = stage.reduction
    n, length, c = out.shape
    gh, gw = height // red, width // red
    if length < gh * gw or length - gh * gw > MAX_PREFIX_TOKENS:
        gh, gw = -(-height // red), -(-width // red)  # patch embeddings that pad the input
    prefix = length - gh * gw
    if prefix < 0:
        raise RuntimeError(
            f"stage {stage.index} ({stage.module}) has {length} tokens, fewer than the "
            f"{gh}x{gw} patch grid of a {height}x{width} image"
        )
    head, body = out[:, :prefix], out[:, prefix:]
    fmap = body.transpose(1, 2).reshape(n, c, gh, gw)

    def back(m: torch.Tensor) -> torch.Tensor:
        return torch.cat([head, m.flatten(2).transpose(1, 2)], dim=1)

    return fmap, back
