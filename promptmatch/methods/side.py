"""``side``: a memory-lean side adapter in the manner of E3VA (Yin et al., "Parameter-efficient is
not sufficient: Exploring Parameter, Memory, and Time Efficient Adapter Tuning for Dense
Predictions", 2023).

A trainable side path runs beside the frozen backbone and reads its stage outputs; no gradient
crosses the backbone, so the backbone runs without autograd (no activations kept for backward:
a training step costs the frozen forward plus the side path and the head). At the boundary of
stage ``k`` (features ``F_k``, C_k channels) a light adapter updates the side state ``s``::

    z   = down(LN(F_k)) + resize(s_{k-1})       (1x1 conv C_k -> d; the previous state, bilinear)
    s_k = GELU(dw(z))                           (depthwise kxk conv)
    F_k' = F_k + up(s_k)                        (1x1 conv d -> C_k, zero-initialised)

``F_k'`` goes only to the decoder, never to stage ``k + 1`` (which gets ``F_k`` as the frozen
backbone computed it); at the last boundary nothing follows, so ``F_k'`` is returned as the
boundary's features. With ``up`` zero-initialised the model starts as the frozen backbone.
Up-projections at levels the decoder never reads (all but the last for a linear head) are left
out: the side state still carries those stages forward.

Defaults: width d = 64, a 3x3 depthwise kernel. Simplified versus the paper: E3VA places
low-rank adapters along the backbone and joins them on a gradient backpropagation highway that
bypasses it; here the side path acts once per stage boundary
(the boundaries promptmatch exposes for every backbone, CNNs included), with a recurrent side
state from stage to stage. It applies to every staged backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..staging import Stage
from .base import MethodConfig, TuningMethod, register_method

__all__ = ["SideAdapterConfig", "SideAdapter"]


@dataclass
class SideAdapterConfig(MethodConfig):
    """Settings of the side adapter (see the module docstring)."""

    hidden_dim: int = field(
        default=64, metadata={"help": "width d of the side path (a light bottleneck, as adapters' usual 64)"}
    )
    kernel_size: int = field(default=3, metadata={"help": "kernel of the depthwise convolution (odd)"})

    def __post_init__(self) -> None:
        self._check_positive_int("hidden_dim")
        self._check_positive_int("kernel_size")
        if self.kernel_size % 2 == 0:
            self._fail("kernel_size", "odd")


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, with a per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=self.eps).permute(0, 3, 1, 2)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@register_method
class SideAdapter(TuningMethod):
    """A side path of light adapters at the stage boundaries; the backbone runs without autograd."""

    name = "side"
    config_class = SideAdapterConfig
    grad_crosses_backbone = False

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: SideAdapterConfig) -> None:
        super().__init__(stages, num_classes, config)
        d, k = config.hidden_dim, config.kernel_size
        self._last = len(self.stages) - 1
        self.norm = nn.ModuleDict()
        self.down = nn.ModuleDict()
        self.spatial = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for st in self.stages:
            key, c = str(st.index), int(st.channels)
            self.norm[key] = _ChannelNorm(c)
            self.down[key] = nn.Conv2d(c, d, 1)
            self.spatial[key] = nn.Conv2d(d, d, k, padding=k // 2, groups=d)
            up = nn.Conv2d(d, c, 1)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
            self.up[key] = up

    def init_state(self) -> Dict[str, Any]:
        return {"interim": {}, "side": None, "taps": []}

    def decoder_reads(self, stages: Sequence[int]) -> None:
        """Drop the up-projections of the levels the decoder never reads (the last one stays:
        its output is the boundary's features), so that no parameter goes untrained."""
        read = {int(s) % (self._last + 1) for s in stages} | {self._last}
        for key in list(self.up.keys()):
            if int(key) not in read:
                del self.up[key]

    def boundary(self, index: int, features: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        key = str(index)
        prev: Optional[torch.Tensor] = state.get("side")
        z = self.down[key](self.norm[key](features.detach()))
        if prev is not None:
            if prev.shape[-2:] != z.shape[-2:]:
                prev = F.interpolate(prev, size=z.shape[-2:], mode="bilinear", align_corners=False)
            z = z + prev
        side = F.gelu(self.spatial[key](z))
        state["side"] = side
        if key not in self.up:
            return features
        out = features + self.up[key](side).to(features.dtype)
        if index == self._last:  # nothing follows: the features themselves may carry the change
            return out
        state["taps"].append((features, out))  # for the decoder only: the next stage gets `features`
        return features
