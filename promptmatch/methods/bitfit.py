"""``bitfit``: only the bias terms of the backbone train (Ben Zaken et al., ACL 2022)."""
from __future__ import annotations

from dataclasses import dataclass, field
from torch import nn

from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method

__all__ = ["BitFitConfig", "BitFit", "is_bias_parameter"]


def is_bias_parameter(name: str) -> bool:
    """Whether a parameter name is a bias term: ``*.bias`` of linear, conv and norm layers,
    and separate attention biases such as BEiT/EVA's ``q_bias``/``v_bias``."""
    last = name.rsplit(".", 1)[-1]
    return last == "bias" or last.endswith("_bias")


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Ben Zaken et al., *BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models*, ACL 2022): every bias term of the backbone
    trains, all other weights stay frozen.

    As in the paper (which trains *all* bias terms, LayerNorm's included), the biases of
    normalisation layers (LayerNorm, BatchNorm, GroupNorm) count as biases and train. The
    backbone otherwise stays frozen and in eval mode: BatchNorm keeps its pretrained running
    statistics (they are not biases, and updating them would make the method no longer
    "biases only"); only its affine bias (beta) learns. Biases after the last stage (a ViT's
    final norm) stay frozen: the staged forward never reaches them.
    """

    norm_biases: bool = field(
        default=True,
        metadata={"help": "also train the biases (beta) of normalisation layers (BitFit paper: yes)"},
    )

    def __post_init__(self) -> None:
        self._check_bool("norm_biases")


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@register_method
class BitFit(TuningMethod):
    """Bias-only tuning of a frozen backbone; nothing sits between the stages."""

    name = "bitfit"
    trains_inside_backbone = True
    shares_backbone = False  # its biases are the backbone's own
    config_class = BitFitConfig

    def attach(self, backbone: nn.Module) -> None:
        found = False
        for mod in backbone.modules():
            if not self.config.norm_biases and isinstance(mod, _NORMS):
                continue
            for n, p in mod.named_parameters(recurse=False):
                if is_bias_parameter(n):
                    p.requires_grad_(True)
                    found = True
        if not found:
            raise MethodNotApplicableError(f"bitfit found no bias parameters in {type(backbone).__name__}")
