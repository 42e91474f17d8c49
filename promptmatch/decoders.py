"""Segmentation decoders that read the boundary features of a staged backbone."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .staging import Stage

__all__ = ["LinearDecoder", "MultiLevelDecoder", "build_decoder", "list_decoders", "DECODERS"]


class LinearDecoder(nn.Module):
    """The linear decoder of the benchmarking protocol: one linear map on the last features.

    A BatchNorm before the linear layer puts the frozen features of any family on one
    scale (ViT block outputs have channels of very different magnitude); it folds into the
    linear layer at inference.
    """

    def __init__(self, stages: Sequence[Stage], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        c = stages[-1].channels
        self.norm = nn.BatchNorm2d(c)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(features[-1])))

    def stages_read(self, num_stages: int) -> Tuple[int, ...]:
        """The stage indices whose features this decoder reads: the last one."""
        return (num_stages - 1,)


class MultiLevelDecoder(nn.Module):
    """A light multi-level head: every stage projected to ``embed_dim``, brought to the finest
    stage's grid, concatenated, fused and classified (in the spirit of SegFormer's head)."""

    def __init__(
        self, stages: Sequence[Stage], num_classes: int, embed_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.proj = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(s.channels), nn.Conv2d(s.channels, embed_dim, 1)) for s in stages
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(stages), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        maps = []
        for proj, f in zip(self.proj, features):
            y = proj(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            maps.append(y)
        return self.classifier(self.dropout(self.fuse(torch.cat(maps, 1))))

    def stages_read(self, num_stages: int) -> Tuple[int, ...]:
        """The stage indices whose features this decoder reads: all of them."""
        return tuple(range(num_stages))


DECODERS: Dict[str, Type[nn.Module]] = {"linear": LinearDecoder, "multilevel": MultiLevelDecoder}


def list_decoders() -> List[str]:
    return sorted(DECODERS)


def build_decoder(
    name: str, stages: Sequence[Stage], num_classes: int, config: Optional[Mapping[str, Any]] = None
) -> nn.Module:
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; available decoders: {list_decoders()}")
    try:
        return DECODERS[name](stages, num_classes, **dict(config or {}))
    except TypeError as e:
        raise ValueError(f"bad decoder_cfg for {name!r}: {e}") from None
