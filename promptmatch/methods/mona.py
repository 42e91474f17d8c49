"""``mona``: Multi-cognitive visual adapters (Yin et al., "5%>100%: Breaking Performance Shackles
of Full Fine-Tuning on Visual Recognition Tasks", CVPR 2025).

Two adapters per transformer block, on the residual stream: one after the attention's
residual sum, one after the MLP's. Each computes::

    z  = s1 * LN(x) + s2 * x                         (scaled LayerNorm; s1 = 1e-6, s2 = 1)
    z  = down(z)                                     (C -> 64)
    z  = avg(dw3(z), dw5(z), dw7(z)) + z             (depthwise convs on the patch grid)
    z  = z + proj(z)                                 (1x1 aggregation, with its skip)
    x' = x + up(dropout(GELU(z)))                    (64 -> C)

Defaults from the paper and its released code: width 64, the three depthwise kernels 3, 5, 7,
``s1`` initialised to 1e-6 and ``s2`` to 1, dropout 0.1. One deviation: ``up`` (weight and
bias) starts at zero, so at initialisation the model computes exactly what the frozen backbone
computes (the paper initialises it randomly; its adapter starts as a small perturbation).

The convolutions need the patch grid: Swin blocks carry their tokens as an (N, H, W, C) map;
PVTv2 blocks get the grid as an argument; ViT-like models (ViT, DeiT, EVA, DINOv2) have their
grid read off the patch embedding of each forward pass, and their prefix tokens (class,
registers) skip the spatial convolutions (they get the 1x1 path only). Blocks are the
modules with an ``attn``, an ``mlp`` and the two residual branches ``drop_path1`` /
``drop_path2`` of timm's blocks: the first adapter acts on ``drop_path1``'s output ``a``
through ``a + mona(x + a)`` (``x`` the block's input), which is exactly ``x + a`` followed by
the adapter; the second on the block's output. CNNs get a :class:`MethodNotApplicableError`.

Hooks keep no per-pass state on the module except, for the length of one block's forward, the
block's input (kept per thread, so several threads can run one model).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..staging import Stage
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method

__all__ = ["MonaConfig", "Mona", "MonaAdapter", "attn_mlp_blocks"]

Grid = Tuple[int, int]


@dataclass
class MonaConfig(MethodConfig):
    """Settings of Mona (defaults from the paper and its released code: see the module docstring)."""

    bottleneck_dim: int = field(default=64, metadata={"help": "width of the adapter (paper: 64)"})
    kernel_sizes: Tuple[int, ...] = field(
        default=(3, 5, 7), metadata={"help": "kernels of the averaged depthwise convolutions (paper: 3, 5, 7)"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout after the GELU (paper code: 0.1)"})
    s1_init: float = field(
        default=1e-6, metadata={"help": "initial scale of LN(x) in the scaled LayerNorm (paper code: 1e-6)"}
    )
    s2_init: float = field(default=1.0, metadata={"help": "initial scale of x in the scaled LayerNorm (paper code: 1)"})

    def __post_init__(self) -> None:
        self._check_positive_int("bottleneck_dim")
        ks = tuple(self.kernel_sizes) if isinstance(self.kernel_sizes, (list, tuple)) else None
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in ks):
            raise ValueError(
                f"MonaConfig.kernel_sizes must be a non-empty list of odd ints >= 1, got {self.kernel_sizes!r}")
        self.kernel_sizes = ks
        self._check_dropout("dropout")
        for name in ("s1_init", "s2_init"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self._fail(name, "a finite number")
            setattr(self, name, float(v))


class MonaAdapter(nn.Module):
    """One Mona adapter: the change ``up(dropout(GELU(conv(down(s1 * LN(x) + s2 * x)))))`` it adds
    to channel-last tokens ``x``; zero at initialisation."""

    def __init__(self, dim: int, config: MonaConfig) -> None:
        super().__init__()
        d = config.bottleneck_dim
        self.norm = nn.LayerNorm(dim)
        self.s1 = nn.Parameter(torch.full((dim,), config.s1_init))
        self.s2 = nn.Parameter(torch.full((dim,), config.s2_init))
        self.down = nn.Linear(dim, d)
        self.convs = nn.ModuleList(nn.Conv2d(d, d, k, padding=k // 2, groups=d) for k in config.kernel_sizes)
        self.proj = nn.Linear(d, d)  # the paper's 1x1 convolution, on channel-last tokens
        self.up = nn.Linear(d, dim)
        self.dropout = config.dropout
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, grid: Grid, prefix: int) -> torch.Tensor:
        """``x``: (N, L, C) tokens (``prefix`` of them before the ``grid`` of patches) or an
        (N, H, W, C) map; returns the change to add to ``x``."""
        z = self.down(self.norm(x) * self.s1 + x * self.s2)
        z = self._spatial(z, grid, prefix)
        z = z + self.proj(z)
        z = F.dropout(F.gelu(z), p=self.dropout, training=self.training)
        return self.up(z).to(x.dtype)

    def _spatial(self, z: torch.Tensor, grid: Grid, prefix: int) -> torch.Tensor:
        if z.ndim == 4:  # (N, H, W, d)
            m = z.permute(0, 3, 1, 2)
            return (sum(c(m) for c in self.convs) / len(self.convs) + m).permute(0, 2, 3, 1)
        n, length, d = z.shape
        gh, gw = grid
        head, body = z[:, :prefix], z[:, prefix:]
        m = body.transpose(1, 2).reshape(n, d, gh, gw)
        m = sum(c(m) for c in self.convs) / len(self.convs) + m
        return torch.cat([head, m.flatten(2).transpose(1, 2)], dim=1)


def attn_mlp_blocks(backbone: nn.Module) -> List[Tuple[str, nn.Module, int]]:
    """``(name, block, width)`` of every transformer block (a module with ``attn`` and ``mlp``),
    in model order; the width is the MLP's output width."""
    found = []
    for name, m in backbone.named_modules():
        mlp = getattr(m, "mlp", None)
        if not isinstance(mlp, nn.Module) or getattr(m, "attn", None) is None:
            continue
        linears = [l for l in mlp.modules() if isinstance(l, nn.Linear)]
        convs = [c for c in mlp.modules() if isinstance(c, nn.Conv2d) and c.groups == 1]
        width = linears[-1].out_features if linears else (convs[-1].out_channels if convs else 0)
        if width:
            found.append((name, m, width))
    return found


def _grid_of_patch_embed(pe: nn.Module, images: torch.Tensor, out: torch.Tensor) -> Grid:
    if out.ndim == 4:  # timm's dynamic_img_size: an NHWC map
        return int(out.shape[1]), int(out.shape[2])
    feat = getattr(pe, "dynamic_feat_size", None)
    if callable(feat):
        gh, gw = feat(tuple(images.shape[-2:]))
        return int(gh), int(gw)
    gh, gw = getattr(pe, "grid_size")
    return int(gh), int(gw)


@register_method
class Mona(TuningMethod):
    """Mona adapters after the attention and after the MLP of every transformer block."""

    name = "mona"
    trains_inside_backbone = True
    config_class = MonaConfig
    needs = ("attn_mlp_blocks",)

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: MonaConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.adapters = nn.ModuleList()  # 2 per block: after attention, after the MLP
        self.adapted_modules: Tuple[str, ...] = ()
        self._inputs: Dict[Tuple[int, int], Tuple[torch.Tensor, Optional[Grid], int]] = {}
        self._grids: Dict[int, Grid] = {}  # patch grid of the current pass, per thread (ViT-like)

    def attach(self, backbone: nn.Module) -> None:
        self.check_not_hooked()
        blocks = attn_mlp_blocks(backbone)
        what = (f"mona needs transformer blocks with `attn`, `mlp` and timm's residual branches "
                f"`drop_path1`/`drop_path2` on a patch grid (ViT, DeiT, EVA, DINOv2, Swin, PVTv2); "
                f"{type(backbone).__name__}")
        if not blocks:
            raise MethodNotApplicableError(f"{what} has none: its convolutions need token blocks (a CNN has none)")
        bad = [n for n, b, _ in blocks if not isinstance(getattr(b, "drop_path1", None), nn.Module)
               or getattr(b, "drop_path2", None) is b.drop_path1]  # one module for both branches
        if bad:
            raise MethodNotApplicableError(f"{what} has blocks without a `drop_path1` of their own ({bad[:3]})")
        pe = getattr(backbone, "patch_embed", None)
        if len(self.adapters) == 0:
            ref = next(iter(backbone.parameters()), None)
            for _, _, width in blocks:
                self.adapters.append(MonaAdapter(width, self.config))
                self.adapters.append(MonaAdapter(width, self.config))
            if ref is not None:
                self.adapters.to(ref.device)
        self.adapted_modules = tuple(n for n, _, _ in blocks)
        if isinstance(pe, nn.Module):
            self.hook_backbone(pe, self._on_patch_embed)
        for i, (_, blk, _) in enumerate(blocks):
            self.hook_backbone(blk, partial(self._pre_hook, i), pre=True, with_kwargs=True)
            self.hook_backbone(blk.drop_path1, partial(self._attn_hook, i))
            # before any other hook: a stage boundary on the block sees the adapted output
            self.hook_backbone(blk, partial(self._mlp_hook, i), prepend=True)

    def detach(self) -> None:
        """Remove the hooks; the backbone computes its plain outputs again."""
        self.remove_hooks()
        self._inputs.clear()
        self._grids.clear()

    # ------------------------------------------------------------------- hooks
    def _on_patch_embed(self, module: nn.Module, args: tuple, output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            self._grids[threading.get_ident()] = _grid_of_patch_embed(module, args[0], output)

    def _layout(self, x: torch.Tensor, given: Optional[Grid]) -> Tuple[Optional[Grid], int]:
        """The patch grid and prefix-token count of a block's input ``x``."""
        if x.ndim == 4:
            return None, 0
        grid = given or self._grids.get(threading.get_ident())
        if grid is None:
            raise RuntimeError("mona: cannot tell the patch grid of the tokens (no patch embedding ran)")
        prefix = x.shape[1] - grid[0] * grid[1]
        if prefix < 0:
            raise RuntimeError(f"mona: {x.shape[1]} tokens do not cover a {grid[0]}x{grid[1]} patch grid")
        return grid, prefix

    def _pre_hook(self, index: int, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        given = args[1] if len(args) > 1 else kwargs.get("feat_size")  # PVTv2 blocks get their grid
        given = (int(given[0]), int(given[1])) if isinstance(given, (tuple, list)) and len(given) == 2 else None
        grid, prefix = self._layout(x, given)
        self._inputs[(threading.get_ident(), index)] = (x, grid, prefix)

    def _attn_hook(self, index: int, module: nn.Module, args: tuple, a: torch.Tensor) -> torch.Tensor:
        x, grid, prefix = self._inputs[(threading.get_ident(), index)]
        y = x.reshape(a.shape) + a  # the residual stream after attention
        return a + self.adapters[2 * index](y, grid, prefix)

    def _mlp_hook(self, index: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        _, grid, prefix = self._inputs.pop((threading.get_ident(), index))
        return out + self.adapters[2 * index + 1](out, grid, prefix)
