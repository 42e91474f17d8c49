"""``adaptformer``: parallel bottleneck adapters beside the MLPs of a frozen transformer
(Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition",
NeurIPS 2022).

In every transformer block, beside the MLP and fed with the MLP's input (the normed tokens
``x``)::

    mlp(x)  ->  mlp(x) + s * up(dropout(relu(down(x))))

Defaults, all from the paper and its released code: bottleneck dim 64, scale ``s = 0.1``,
dropout 0.1 on the bottleneck, ``down`` initialised as in LoRA (Kaiming uniform,
``a = sqrt(5)``), ``up`` and both biases zero, so at initialisation the model computes
exactly what the frozen backbone computes.

The adapters are submodules of the method (``method.adapters.<i>``), applied by a forward
hook on each block's ``mlp``. Blocks are the modules with both an ``attn`` and an ``mlp``
(timm ViT, DeiT, EVA, DINOv2, and also Swin and PVTv2 blocks); CNNs get a
:class:`MethodNotApplicableError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..staging import Stage
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method

__all__ = ["AdaptFormerConfig", "AdaptFormer", "ParallelAdapter"]


@dataclass
class AdaptFormerConfig(MethodConfig):
    """Settings of AdaptFormer (defaults from the paper: see the module docstring)."""

    bottleneck_dim: int = field(default=64, metadata={"help": "hidden width of each adapter (paper: 64)"})
    scale: float = field(default=0.1, metadata={"help": "scale s of the adapter branch (paper: 0.1)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter bottleneck (paper code: 0.1)"})

    def __post_init__(self) -> None:
        self._check_positive_int("bottleneck_dim")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"AdaptFormerConfig.scale must be a finite number, got {self.scale!r}")
        self.scale = float(self.scale)
        self._check_dropout("dropout")


class ParallelAdapter(nn.Module):
    """``s * up(dropout(relu(down(x))))``; zero at initialisation."""

    def __init__(self, dim: int, bottleneck_dim: int, scale: float, dropout: float, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, out_dim or dim)
        self.dropout = dropout
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(h) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, dropout={self.dropout}"


def _transformer_mlps(backbone: nn.Module) -> List[Tuple[str, nn.Module, int, int]]:
    """(name, mlp, in_dim, out_dim) of the MLP of every transformer block, in model order."""
    found = []
    for name, m in backbone.named_modules():
        mlp = getattr(m, "mlp", None)
        if not isinstance(mlp, nn.Module) or getattr(m, "attn", None) is None:
            continue
        linears = [l for l in mlp.modules() if isinstance(l, nn.Linear)]
        if not linears:
            continue
        found.append((f"{name}.mlp" if name else "mlp", mlp, linears[0].in_features, linears[-1].out_features))
    return found


@register_method
class AdaptFormer(TuningMethod):
    """Parallel adapters beside the MLP of every transformer block of a frozen backbone."""

    name = "adaptformer"
    trains_inside_backbone = True
    config_class = AdaptFormerConfig
    needs = ("attn_mlp_blocks",)

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: AdaptFormerConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.adapters = nn.ModuleList()
        self.adapted_modules: Tuple[str, ...] = ()
        self._backbone_ref: Optional[nn.Module] = None

    def attach(self, backbone: nn.Module) -> None:
        self.check_not_hooked()
        mlps = _transformer_mlps(backbone)
        if not mlps:
            raise MethodNotApplicableError(
                f"adaptformer needs a transformer backbone whose blocks have an `attn` and an `mlp`; "
                f"{type(backbone).__name__} has none (it applies to ViT, DeiT, EVA, DINOv2, Swin and PVTv2 models)"
            )
        cfg: AdaptFormerConfig = self.config
        object.__setattr__(self, "_backbone_ref", backbone)  # not a submodule: keeps its weights out
        if len(self.adapters) == 0:
            ref = next(iter(backbone.parameters()), None)
            for _, _, d_in, d_out in mlps:
                self.adapters.append(ParallelAdapter(d_in, cfg.bottleneck_dim, cfg.scale, cfg.dropout, d_out))
            if ref is not None:
                self.adapters.to(ref.device)
        self.adapted_modules = tuple(n for n, _, _, _ in mlps)
        for i, (_, mlp, _, _) in enumerate(mlps):
            self.hook_backbone(mlp, partial(self._block_hook, i))

    def detach(self) -> None:
        """Remove the hooks; the backbone computes its plain outputs again."""
        self.remove_hooks()
        object.__setattr__(self, "_backbone_ref", None)

    def _block_hook(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + self.adapters[index](x).to(output.dtype)
