"""``rein``: Rein (Wei et al., "Stronger, Fewer, & Superior: Harnessing Vision Foundation Models
for Domain Generalized Semantic Segmentation", CVPR 2024).

After every transformer block ``i`` of a frozen backbone, its output features ``f`` (one
C-wide vector per patch position) are refined through a set of ``m`` learnable tokens
``T_i`` (m x C), made low-rank as ``T_i = A_i B_i`` (A_i: m x r, B_i: r x C)::

    S     = softmax(f T_i^T / sqrt(C))            (each position's similarity to the tokens)
    delta = S (T_i W_T + b_T)                     (the tokens, projected, weighted by S)
    f'    = f + (delta + f) W_f + b_f

Defaults from the paper: m = 100 tokens and rank r = 16 per layer, the two projections
``W_T`` (token -> feature) and ``W_f`` (the output MLP) shared by all layers, tokens initialised
uniformly as in VPT and Rein's code. ``W_f`` and ``b_f`` start at zero (Rein's code's
``zero_mlp_delta_f`` option, with its fixed scale 1), so at initialisation the model computes
exactly what the frozen backbone computes.

Deviations, for a segmentation head that is not Mask2Former: Rein's link from its tokens to
Mask2Former's object queries (and the query projections that come with it) is left out: the
decoders of this library have no queries. Prefix tokens (class, registers) pass unchanged, as
in Rein's code. Where blocks differ in width (Swin, PVTv2: one width per stage), the two
projections are shared by the blocks of one width rather than by all.

Blocks are the modules with an ``attn`` and an ``mlp`` (ViT, DeiT, EVA, DINOv2, Swin, PVTv2);
a CNN has no token blocks and gets a :class:`MethodNotApplicableError` (the paper defines Rein
on the layers of a vision transformer only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import List, Sequence, Tuple

import torch
from torch import nn

from ..staging import Stage
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method
from .mona import attn_mlp_blocks

__all__ = ["ReinConfig", "Rein"]


@dataclass
class ReinConfig(MethodConfig):
    """Settings of Rein (defaults from the paper: see the module docstring)."""

    num_tokens: int = field(default=100, metadata={"help": "learnable tokens m per layer (paper: 100)"})
    rank: int = field(default=16, metadata={"help": "rank r of the tokens T = A B (paper: 16)"})

    def __post_init__(self) -> None:
        self._check_positive_int("num_tokens")
        self._check_positive_int("rank")


@register_method
class Rein(TuningMethod):
    """Learnable low-rank tokens that refine the output of every transformer block."""

    name = "rein"
    trains_inside_backbone = True
    config_class = ReinConfig
    needs = ("attn_mlp_blocks",)

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: ReinConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.tokens_a = nn.ParameterList()  # per block: (m, r)
        self.tokens_b = nn.ParameterList()  # per block: (r, C)
        self.token_proj = nn.ModuleDict()  # per width: W_T, b_T (shared by the blocks of that width)
        self.out_proj = nn.ModuleDict()  # per width: W_f, b_f (zero-initialised)
        self.adapted_modules: Tuple[str, ...] = ()
        self._widths: List[int] = []
        self._prefix = 0

    def attach(self, backbone: nn.Module) -> None:
        self.check_not_hooked()
        blocks = attn_mlp_blocks(backbone)
        if not blocks:
            raise MethodNotApplicableError(
                f"rein refines the outputs of transformer blocks (modules with `attn` and `mlp`: ViT, DeiT, EVA, "
                f"DINOv2, Swin, PVTv2); {type(backbone).__name__} has none (a CNN has no token blocks)"
            )
        npt = getattr(backbone, "num_prefix_tokens", 0)
        self._prefix = int(npt) if isinstance(npt, int) and not isinstance(npt, bool) else 0
        self._widths = [w for _, _, w in blocks]
        if len(self.tokens_a) == 0:
            self._build(backbone)
        self.adapted_modules = tuple(n for n, _, _ in blocks)
        for i, (_, blk, _) in enumerate(blocks):
            # before any other hook: a stage boundary on the block sees the refined output
            self.hook_backbone(blk, partial(self._block_hook, i), prepend=True)

    def _build(self, backbone: nn.Module) -> None:
        cfg: ReinConfig = self.config
        ps = getattr(getattr(backbone, "patch_embed", None), "patch_size", 16)
        ph, pw = (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))
        for c in self._widths:
            # VPT's uniform bound, with sqrt(C r) for C as in Rein's low-rank tokens
            val = math.sqrt(6.0 / float(3 * ph * pw + math.sqrt(c * cfg.rank)))
            self.tokens_a.append(nn.Parameter(torch.empty(cfg.num_tokens, cfg.rank).uniform_(-val, val)))
            self.tokens_b.append(nn.Parameter(torch.empty(cfg.rank, c).uniform_(-val, val)))
            key = str(c)
            if key not in self.token_proj:
                self.token_proj[key] = nn.Linear(c, c)
                out = nn.Linear(c, c)
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
                self.out_proj[key] = out
        ref = next(iter(backbone.parameters()), None)
        if ref is not None:
            self.to(ref.device)

    def detach(self) -> None:
        """Remove the hooks; the backbone computes its plain outputs again."""
        self.remove_hooks()

    def refine(self, index: int, f: torch.Tensor) -> torch.Tensor:
        """The change Rein adds to channel-last features ``f`` (..., C) after block ``index``."""
        key = str(self._widths[index])
        tokens = (self.tokens_a[index] @ self.tokens_b[index]).to(f.dtype)  # (m, C)
        sim = torch.softmax(f @ tokens.t() / math.sqrt(f.shape[-1]), dim=-1)  # (..., m)
        delta = sim @ self.token_proj[key](tokens)
        return self.out_proj[key](delta + f).to(f.dtype)

    def _block_hook(self, index: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.ndim == 3 and self._prefix:  # (N, L, C) tokens: the prefix passes unchanged
            head, body = out[:, :self._prefix], out[:, self._prefix:]
            return torch.cat([head, body + self.refine(index, body)], dim=1)
        return out + self.refine(index, out)

    def extra_repr(self) -> str:
        cfg: ReinConfig = self.config
        return f"layers={len(self.tokens_a)}, num_tokens={cfg.num_tokens}, rank={cfg.rank}"
