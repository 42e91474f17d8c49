"""``vpt``: Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022).

Learnable prompt tokens are put into the token sequence of a frozen ViT, right after its
prefix tokens (class token, registers):

- ``deep=True`` (VPT-deep, the paper's main variant and the one it reports for ADE20K):
  new prompts at the input of every block, replacing the previous block's prompt outputs;
- ``deep=False`` (VPT-shallow): prompts inserted once, before the first block, and carried
  through the blocks like any other token.

The prompts sit after the prefix tokens, so the stage boundaries see them as extra prefix
tokens: :class:`~promptmatch.staging.StagedBackbone` derives the prefix count as
``L - gh * gw`` and keeps them aside, so the boundary features keep the patch grid. Models
with rotary position embeddings on the patch tokens (EVA-02) get their attention modules'
``num_prefix_tokens`` raised by the prompt count, so the prompts are not rotated.

Defaults and their sources:

- ``num_tokens=10``: VPT's ADE20K row (SETR-PUP, ViT-L/16: head-only 13.18M tunable
  parameters, VPT-deep 13.43M) is 0.25M prompt parameters over 24 blocks of width 1024,
  i.e. about 10 tokens per block; 10 is also the prompt length of most of VPT's released
  configs.
- ``init="xavier_uniform"``: VPT's initialisation, uniform in ``[-v, v]`` with
  ``v = sqrt(6 / (3 * patch_h * patch_w + dim))``.
- ``dropout=0.1``: the prompt dropout of VPT's released configs.
- no prompt projection (VPT's default ``PROJECT=-1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..staging import Stage
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method

__all__ = ["VPTConfig", "VisualPromptTuning"]

_INITS = ("xavier_uniform", "normal")


def token_blocks(backbone: nn.Module, method: str) -> List[nn.Module]:
    """The transformer blocks of a ViT-like token model, or a MethodNotApplicableError."""
    blocks = getattr(backbone, "blocks", None)
    npt = getattr(backbone, "num_prefix_tokens", None)
    if (
        not isinstance(blocks, (nn.ModuleList, nn.Sequential))
        or len(blocks) == 0
        or isinstance(npt, bool)
        or not isinstance(npt, int)
        or getattr(backbone, "patch_embed", None) is None
    ):
        raise MethodNotApplicableError(
            f"{method} needs a ViT-like backbone with token blocks; {type(backbone).__name__} has none "
            "(it applies to timm VisionTransformer, DeiT, EVA and DINOv2 models: `blocks`, `patch_embed` "
            "and `num_prefix_tokens`)"
        )
    return list(blocks)


@dataclass
class VPTConfig(MethodConfig):
    """Settings of Visual Prompt Tuning (defaults and sources: see the module docstring)."""

    num_tokens: int = field(default=10, metadata={"help": "prompt tokens per block (deep) or in all (shallow)"})
    deep: bool = field(
        default=True, metadata={"help": "VPT-deep: new prompts at every block; False: VPT-shallow, once before the first"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout on the prompt tokens while training"})
    init: str = field(
        default="xavier_uniform",
        metadata={"help": "prompt initialisation: 'xavier_uniform' (VPT's) or 'normal' (std 0.02)"},
    )

    def __post_init__(self) -> None:
        self._check_positive_int("num_tokens")
        self._check_bool("deep")
        self._check_dropout("dropout")
        if self.init not in _INITS:
            raise ValueError(f"VPTConfig.init must be one of {list(_INITS)}, got {self.init!r}")


@register_method
class VisualPromptTuning(TuningMethod):
    """Learnable prompt tokens in a frozen ViT (VPT-deep or VPT-shallow).

    The prompts are made in :meth:`attach` (their number depends on the backbone's depth)
    as ``prompts`` of shape ``(depth or 1, num_tokens, dim)``; forward pre-hooks on the
    blocks put them into the sequence. The boundary features are left unchanged.
    """

    name = "vpt"
    trains_inside_backbone = True
    config_class = VPTConfig
    needs = ("token_blocks",)
    starts_as_backbone = False  # the prompt tokens start random and change every token's attention

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: VPTConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.prompt_dropout = nn.Dropout(config.dropout)
        self.register_parameter("prompts", None)
        self._npt_patched: List[Tuple[nn.Module, int]] = []
        self._backbone_ref: Optional[nn.Module] = None

    # ------------------------------------------------------------------ attach
    def attach(self, backbone: nn.Module) -> None:
        self.check_not_hooked()
        cfg: VPTConfig = self.config
        blocks = token_blocks(backbone, self.name)
        dim = _embed_dim(backbone, self.stages)
        object.__setattr__(self, "_backbone_ref", backbone)  # not a submodule: keeps its weights out
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)
        if self.prompts is None:
            n = len(blocks) if cfg.deep else 1
            ref = next(iter(backbone.parameters()), None)
            prompts = torch.empty(n, cfg.num_tokens, dim, device=getattr(ref, "device", None))
            if cfg.init == "xavier_uniform":
                ph, pw = _patch_size(backbone)
                val = math.sqrt(6.0 / float(3 * ph * pw + dim))
                nn.init.uniform_(prompts, -val, val)
            else:
                nn.init.normal_(prompts, std=0.02)
            self.prompts = nn.Parameter(prompts)
        # attention that rotates every token after the prefix (EVA rope) must skip the prompts
        for blk in blocks:
            for m in blk.modules():
                npt = getattr(m, "num_prefix_tokens", None)
                if isinstance(npt, int) and not isinstance(npt, bool):
                    self._npt_patched.append((m, npt))
                    m.num_prefix_tokens = npt + cfg.num_tokens
        # the changed attention attributes act in every pass through the backbone
        self.shares_backbone = not self._npt_patched
        hooked = blocks if cfg.deep else blocks[:1]
        for i, blk in enumerate(hooked):
            self.hook_backbone(blk, partial(self._block_hook, i), pre=True, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hooks and undo the attention changes; the backbone is plain again."""
        self.remove_hooks()
        for m, npt in self._npt_patched:
            m.num_prefix_tokens = npt
        self._npt_patched = []
        self.shares_backbone = True
        object.__setattr__(self, "_backbone_ref", None)

    # ------------------------------------------------------------------- hooks
    def _block_hook(self, index: int, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        in_args = bool(args)
        x = args[0] if in_args else kwargs["x"]
        t = self.config.num_tokens
        npt = self.num_prefix_tokens
        p = self.prompt_dropout(self.prompts[index]).to(dtype=x.dtype, device=x.device)
        p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, npt:] if index == 0 else x[:, npt + t:]  # block 0 inserts, later blocks replace
        x = torch.cat([x[:, :npt], p, rest], dim=1)
        if in_args:
            return (x,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["x"] = x
        return args, kwargs

    def extra_repr(self) -> str:
        cfg: VPTConfig = self.config
        shape = tuple(self.prompts.shape) if self.prompts is not None else None
        return f"{'deep' if cfg.deep else 'shallow'}, num_tokens={cfg.num_tokens}, prompts={shape}"


def _embed_dim(backbone: nn.Module, stages: Sequence[Stage]) -> int:
    for name in ("embed_dim", "num_features"):
        v = getattr(backbone, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return int(stages[0].channels)


def _patch_size(backbone: nn.Module) -> Tuple[int, int]:
    ps = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if ps is None:
        return (16, 16)
    if isinstance(ps, int):
        return (ps, ps)
    return (int(ps[0]), int(ps[1]))
