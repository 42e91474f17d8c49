"""``full``: end-to-end fine-tuning of the whole backbone (the upper-bound baseline)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .base import MethodConfig, TuningMethod, register_method

__all__ = ["FullFineTuneConfig", "FullFineTune"]


@dataclass
class FullFineTuneConfig(MethodConfig):
    """End-to-end fine-tuning: every backbone parameter the stages use trains, BatchNorm
    statistics update. Parameters after the last stage (a ViT's final norm, a classifier
    head) stay frozen: the staged forward never reaches them, so they would get no gradient.

    The encoder learning rate is the base learning rate times ``backbone_lr_mult`` (0.1),
    the protocol of Kerssies et al., *How to Benchmark Vision Foundation Models for Semantic
    Segmentation* (CVPR 2024 workshops), which fine-tunes the encoder at a tenth of the
    decoder's learning rate.
    """

    backbone_lr_mult: float = field(
        default=0.1, metadata={"help": "learning-rate multiplier of the backbone (Kerssies et al. 2024: 0.1)"}
    )

    def __post_init__(self) -> None:
        v = self.backbone_lr_mult
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"FullFineTuneConfig.backbone_lr_mult must be a number > 0, got {v!r}")
        self.backbone_lr_mult = float(v)


@register_method
class FullFineTune(TuningMethod):
    """The backbone is not frozen: it trains end to end, follows ``train()``/``eval()`` (so
    BatchNorm statistics update in training) and its buffers go into prompt checkpoints.
    Nothing sits between the stages: :meth:`boundary` returns the features unchanged."""

    name = "full"
    config_class = FullFineTuneConfig
    freezes_backbone = False
    backbone_lr_mult = 0.1
    shares_backbone = False

    def __init__(self, stages, num_classes: int, config: FullFineTuneConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.backbone_lr_mult = config.backbone_lr_mult  # instance value read by param_groups

    def attach(self, backbone: nn.Module) -> None:
        for p in backbone.parameters():
            p.requires_grad_(True)
