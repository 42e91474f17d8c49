"""``linear``: the frozen-backbone baseline (linear probing with the linear decoder)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, TuningMethod, register_method

__all__ = ["LinearProbeConfig", "LinearProbe"]


@dataclass
class LinearProbeConfig(MethodConfig):
    """No settings: nothing between the stages, only the decode head trains."""


@register_method
class LinearProbe(TuningMethod):
    """Frozen backbone, unchanged features: only the decode head trains.

    With ``decoder='linear'`` this is the linear probe of the benchmarking protocol; with
    ``decoder='multilevel'`` the frozen backbone with a multi-level head.
    """

    name = "linear"
    config_class = LinearProbeConfig
