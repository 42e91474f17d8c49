"""Any timm model as an mmseg backbone, built offline from a name and a local weights file."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule

from ..backbones import create_backbone
from ..registry import MODELS
from ..staging import StagedBackbone


@MODELS.register_module()
class TimmBackbone(BaseModule):
    """A plain (not ``features_only``) timm model returning NCHW features at its stage ends.

    Args:
        model_name: timm model name.
        weights: local ``.safetensors`` / ``.pth`` pretrained weights (no download ever).
        weights_remap: match the keys of ``weights`` by order (checkpoints named otherwise).
        out_indices: which stages to return (default: all).
        stage_modules: module names (of the timm model) that end the stages; default from
            ``feature_info``.
        num_stages: number of block groups for plain ViTs (default 4).
        model_kwargs: extra ``timm.create_model`` arguments.
    """

    def __init__(
        self,
        model_name: str,
        weights: Optional[str] = None,
        weights_remap: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        stage_modules: Optional[Sequence[str]] = None,
        num_stages: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        init_cfg=None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if weights is None:
            print_log(
                f"promptmatch.TimmBackbone: no weights given for {model_name!r}; the backbone is randomly "
                "initialised (pass weights='/path/to/file.safetensors' for pretrained weights)",
                logger="current",
                level=logging.WARNING,
            )
        self.model_name = model_name
        self.model = create_backbone(
            model_name, weights=weights, weights_remap=weights_remap, **dict(model_kwargs or {})
        )
        prefixed = [f"model.{m}" for m in stage_modules] if stage_modules is not None else None
        staged = StagedBackbone(self, stage_modules=prefixed, num_stages=num_stages, freeze=False)
        object.__setattr__(self, "staged", staged)
        n = len(staged.stages)
        self.out_indices: Tuple[int, ...] = tuple(range(n)) if out_indices is None else tuple(
            i % n for i in out_indices
        )

    @property
    def feature_info(self) -> List[Dict[str, Any]]:
        return [dict(f, module=f"model.{f['module']}") for f in self.model.feature_info]

    @property
    def pretrained_cfg(self):
        return getattr(self.model, "pretrained_cfg", None)

    @property
    def channels(self) -> List[int]:
        """Channels of the returned features, in ``out_indices`` order."""
        return [self.staged.stages[i].channels for i in self.out_indices]

    def init_weights(self) -> None:
        """Weights are loaded when the model is built; nothing to initialise here."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.staged.features(x)
        return tuple(feats[i] for i in self.out_indices)
