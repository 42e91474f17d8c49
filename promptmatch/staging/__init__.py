"""Staged view of a frozen timm (or any) backbone.

A :class:`StagedBackbone` splits a model into stages at named modules (taken from
timm's ``feature_info`` or given by hand), freezes it, and lets a caller read and
*replace* the output of every stage boundary as an NCHW map while the model runs:
the replaced features are what the next stage receives.

The parts, each usable alone: :func:`find_stages` reads the stages as :class:`Stage` data
without running the model, :func:`probe_stages` checks them (and finds unknown channels and
strides) by one forward pass, and :class:`BoundaryHooks` runs the hooked forward pass.
"""
from ._backbone import StagedBackbone, freeze_module, stage_backbone
from ._hooks import BoundaryFn, BoundaryHooks, HookedRun
from ._probe import probe_sizes, probe_stages
from ._stages import Stage, find_stages, group_blocks

__all__ = [
    "BoundaryFn",
    "BoundaryHooks",
    "HookedRun",
    "Stage",
    "StagedBackbone",
    "find_stages",
    "freeze_module",
    "group_blocks",
    "probe_sizes",
    "probe_stages",
    "stage_backbone",
]
