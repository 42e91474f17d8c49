"""The hooked forward pass: forward hooks on the stage modules that show each boundary's output
to a callback as an NCHW map and feed its replacement to the next stage."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ._layout import map_layout, to_map
from ._stages import Stage, not_one_tensor_error

__all__ = ["BoundaryFn", "BoundaryHooks", "HookedRun", "StopForward", "run_to_last_stage"]

BoundaryFn = Callable[[int, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a forward hook once the last module a pass needs has run.

    The backbone's own forward would otherwise go on through the layers after the last stage
    (a ViT's final norm, a classifier head), which cost time and whose output nobody reads. A hook
    cannot return from the forward that called it, so it raises this; :func:`run_to_last_stage`
    is the one place that catches it.
    """


def run_to_last_stage(forward: Callable[[torch.Tensor], object], images: torch.Tensor) -> None:
    """Call ``forward(images)``, ending it early where a hook raises :class:`StopForward`."""
    try:
        forward(images)
    except StopForward:
        pass  # the hooks have seen every stage they need; the rest of the forward is skipped


@dataclass
class HookedRun:
    """One hooked pass: its boundary callback, input size, and the NCHW features collected."""

    callback: Optional[BoundaryFn]
    height: int
    width: int
    features: Dict[int, torch.Tensor] = field(default_factory=dict)
    grad_from_first: bool = False  # turn autograd on at the first boundary
    grad_at_boundaries_only: bool = False  # autograd on inside the callback only (the stages run without)
    stop_early: bool = True  # end the pass at the last boundary


class BoundaryHooks:
    """Forward hooks on the stage modules of ``model``; they act while :attr:`run` is set.

    Each hook views its stage's output as an NCHW map, passes it to the run's callback, hands a
    replacement of the same shape (in the output's own layout) to the rest of the model, and
    stores the map in ``run.features``. With ``run.stop_early`` the last hook ends the pass.
    """

    def __init__(self, model: nn.Module, stages: Sequence[Stage], native_fmt: str) -> None:
        self.model = model
        self.stages = tuple(stages)
        self.native_fmt = native_fmt
        self.run: Optional[HookedRun] = None
        self._layouts: Dict[int, str] = {}  # found at a stage's first output
        self._handles = [
            model.get_submodule(s.module).register_forward_hook(partial(self._on_output, s)) for s in self.stages
        ]

    def _on_output(self, stage: Stage, module: nn.Module, args: object, output: object) -> Optional[torch.Tensor]:
        run = self.run
        if run is None:
            return None
        if not isinstance(output, torch.Tensor):  # normally refused at build time (probe)
            raise RuntimeError(str(not_one_tensor_error(self.model, stage.module, output)))
        fmap, back = to_map(output, self._layout(stage, output), stage, run.height, run.width)
        replaced = None
        if run.callback is not None:
            if run.grad_from_first and not torch.is_grad_enabled():
                torch.set_grad_enabled(True)
            with torch.enable_grad() if run.grad_at_boundaries_only else contextlib.nullcontext():
                new = run.callback(stage.index, fmap)
                if new is not fmap:
                    self._check_replacement(run, stage, fmap, new)
                    fmap = new
                    replaced = back(new)
        run.features[stage.index] = fmap
        if run.stop_early and stage.index == len(self.stages) - 1:
            raise StopForward()
        return replaced

    def _check_replacement(self, run: HookedRun, stage: Stage, fmap: torch.Tensor, new: torch.Tensor) -> None:
        if new.shape != fmap.shape:
            raise RuntimeError(
                f"boundary {stage.index} replacement has shape {tuple(new.shape)}, expected {tuple(fmap.shape)}"
            )
        if run.grad_at_boundaries_only and new.requires_grad and stage.index < len(self.stages) - 1:
            raise RuntimeError(
                f"boundary {stage.index} handed the next stage features that need a gradient, but this pass "
                "runs the backbone without autograd (the method declared that no gradient crosses the "
                "backbone): only the last boundary may change the features with trainable parameters"
            )

    def _layout(self, stage: Stage, out: torch.Tensor) -> str:
        layout = self._layouts.get(stage.index)
        if layout is None:
            if out.ndim not in (3, 4):
                raise RuntimeError(
                    f"stage {stage.index} ({stage.module}) returned a {out.ndim}-d tensor; expected tokens "
                    "(N, L, C) or a map (N, C, H, W) / (N, H, W, C)"
                )
            layout = self._layouts[stage.index] = map_layout(out, stage.channels, self.native_fmt)
        return layout

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
