"""``StagedBackbone``: a frozen backbone split into stages, with read/replace access to the
features at every stage boundary."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._hooks import BoundaryFn, BoundaryHooks, HookedRun, run_to_last_stage
from ._inputs import check_images, fixed_img_size, input_channels, patch_size
from ._probe import autograd_leaves, probe_sizes, probe_stages
from ._stages import Stage, find_stages

__all__ = ["StagedBackbone", "freeze_module", "stage_backbone"]

_logger = logging.getLogger(__name__)


def freeze_module(module: nn.Module) -> None:
    """Turn off gradients for every parameter of ``module`` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


class StagedBackbone:
    """Stage boundaries of a frozen backbone, with read/replace access to their features.

    Args:
        model: the backbone, typically a timm model. It is frozen in place and keeps
            its state_dict keys; forward hooks are registered on its boundary modules.
        stage_modules: names of the modules whose outputs end the stages (e.g.
            ``["layer1", "layer2", "layer3", "layer4"]``). Default: from
            ``model.feature_info``.
        num_stages: for plain ViTs (all boundaries at one stride), the number of
            equal groups of blocks to use as stages (default 4).
        min_reduction: boundaries with a smaller stride than this (stems) are left out
            when stages come from ``feature_info``.
        freeze: freeze the model (no gradients, eval mode for good).
        probe_size: input size of the one forward pass that finds channels and strides of
            hand-named stages.
    """

    def __init__(
        self,
        model: nn.Module,
        stage_modules: Optional[Sequence[str]] = None,
        num_stages: Optional[int] = None,
        min_reduction: int = 4,
        freeze: bool = True,
        probe_size: Tuple[int, int] = (224, 224),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(model).__name__}")
        if getattr(model, "_promptmatch_staged", None) is not None:
            raise ValueError(
                "this backbone is already staged; reuse its StagedBackbone "
                "(promptmatch.stage_backbone(model) returns it) instead of staging it twice"
            )
        self.model = model
        self.patch_size = patch_size(model)
        self.fixed_img_size = fixed_img_size(model)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.native_fmt = str(getattr(model, "output_fmt", "NCHW"))
        self.probe_size = (int(probe_size[0]), int(probe_size[1]))
        self.stages: Tuple[Stage, ...] = probe_stages(
            model, find_stages(model, stage_modules, num_stages, min_reduction), self.probe_size,
            self.fixed_img_size, self.patch_size, self.native_fmt,
        )
        self._hooks = BoundaryHooks(model, self.stages, self.native_fmt)
        if freeze:
            freeze_module(model)
        self.frozen = freeze
        self._disable_grad_checkpointing()
        model._promptmatch_staged = self  # type: ignore[attr-defined]

    # --------------------------------------------------------------- freezing
    def _disable_grad_checkpointing(self) -> None:
        if getattr(self.model, "grad_checkpointing", False):
            _logger.warning(
                "gradient checkpointing of the frozen backbone is turned off: it would re-run the "
                "boundary hooks (and the matchers) during recomputation"
            )
        setter = getattr(self.model, "set_grad_checkpointing", None)
        if callable(setter):
            try:
                setter(False)
            except Exception:  # pragma: no cover - models whose setter only enables
                pass

    def freeze(self) -> None:
        """Freeze the model now (no gradients, eval mode for good)."""
        freeze_module(self.model)
        self.frozen = True

    def keep_frozen(self) -> None:
        """Put the backbone back in eval mode (call after any ``train()``)."""
        if self.frozen:
            self.model.eval()

    def unreached_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter of the model that requires grad but that
        no stage's features depend on: modules after the last stage (a ViT's final norm, a
        classifier head), which the staged forward never runs, and anything else no gradient
        from the features reaches. Such a parameter never gets a gradient (and DDP without
        ``find_unused_parameters`` fails on it).

        Found by one forward pass with autograd on a small input (every module in eval mode,
        its own flags restored after), walking the graph without a backward pass. Empty when
        nothing requires grad, under ``torch.inference_mode`` (no graph to walk), or when the
        model runs on none of the probe's input sizes (a warning says so).
        """
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable or torch.is_inference_mode_enabled():
            return []
        ref = next((p for p in self.model.parameters() if p.is_floating_point()), trainable[0][1])
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # no BatchNorm statistics change, no dropout
        feats: Optional[List[torch.Tensor]] = None
        try:
            for size in probe_sizes(self.stages, self.probe_size, self.fixed_img_size, self.patch_size):
                images = torch.zeros(1, self.in_chans or 3, *size, device=ref.device, dtype=ref.dtype)
                try:
                    with torch.enable_grad():
                        feats = self.forward(images, check=False)
                    break
                except Exception as e:  # another size may work; none working is reported below
                    _logger.debug("forward pass of %s at %s failed: %r", type(self.model).__name__, size, e)
        finally:
            for m, flag in flags:
                m.training = flag
        if feats is None:
            _logger.warning("could not run %s on a probe input to find parameters no gradient reaches; "
                            "all %d trainable ones stay trainable", type(self.model).__name__, len(trainable))
            return []
        reached = autograd_leaves(feats)
        return [(n, p) for n, p in trainable if id(p) not in reached]

    # ------------------------------------------------------------------ input
    def check_input(self, images: torch.Tensor) -> None:
        """Raise a clear error if ``images`` cannot go through this backbone."""
        check_images(images, self.in_chans, self.fixed_img_size, self.patch_size, max(s.reduction for s in self.stages))

    @property
    def in_chans(self) -> Optional[int]:
        """Image channels the backbone takes, or None if it does not tell."""
        return input_channels(self.model)

    # ---------------------------------------------------------------- forward
    @contextmanager
    def session(
        self,
        images: torch.Tensor,
        on_boundary: Optional[BoundaryFn] = None,
        stop_early: bool = False,
        autograd_from_start: bool = False,
        autograd_at_boundaries_only: bool = False,
    ) -> Iterator[Dict[int, torch.Tensor]]:
        """Make the boundary hooks active while the caller runs the model on ``images``.

        Yields the dict that collects each boundary's (possibly replaced) NCHW features.
        ``on_boundary(index, features)`` may return replacement features of the same shape;
        they are fed to the next stage. With ``stop_early`` the pass ends at the last
        boundary (callers must then run the model inside :meth:`forward`). Stages before the
        first boundary run without autograd when the backbone is frozen, unless
        ``autograd_from_start`` (a method trains parameters inside those stages) or some
        backbone parameter requires grad. With ``autograd_at_boundaries_only`` (a method
        through which no gradient crosses the backbone) no stage runs with autograd: only
        ``on_boundary`` does, and it may not hand the next stage features that need a
        gradient.
        """
        if self._hooks.run is not None:
            raise RuntimeError("a StagedBackbone session is already running (sessions do not nest)")
        self.keep_frozen()
        if getattr(self.model, "grad_checkpointing", False):
            self._disable_grad_checkpointing()
        grad_mode = torch.is_grad_enabled()
        run = HookedRun(on_boundary, int(images.shape[-2]), int(images.shape[-1]), stop_early=stop_early)
        # a frozen backbone needs no autograd before the first boundary whose output may
        # change, unless a method trains parameters inside it (biases, LoRA, ...)
        if (
            self.frozen
            and grad_mode
            and on_boundary is not None
            and not images.requires_grad
            and not autograd_from_start
            and not any(p.requires_grad for p in self.model.parameters())
        ):
            if autograd_at_boundaries_only:
                run.grad_at_boundaries_only = True
            else:
                run.grad_from_first = True
            torch.set_grad_enabled(False)
        self._hooks.run = run
        try:
            yield run.features
        finally:
            self._hooks.run = None
            torch.set_grad_enabled(grad_mode)
        if len(run.features) != len(self.stages):
            missing = [self.stages[i].module for i in range(len(self.stages)) if i not in run.features]
            raise RuntimeError(f"the forward pass never reached stage modules {missing}")

    @property
    def active(self) -> bool:
        """Whether a session is running."""
        return self._hooks.run is not None

    def forward(
        self,
        images: torch.Tensor,
        on_boundary: Optional[BoundaryFn] = None,
        check: bool = True,
        autograd_from_start: bool = False,
        autograd_at_boundaries_only: bool = False,
    ) -> List[torch.Tensor]:
        """Run the backbone up to its last stage and return every boundary's NCHW features.

        ``on_boundary(index, features)`` may return replacement features of the same
        shape; they are fed to the next stage and returned in place of the originals.
        """
        if check:
            self.check_input(images)
        with self.session(images, on_boundary, stop_early=True, autograd_from_start=autograd_from_start,
                          autograd_at_boundaries_only=autograd_at_boundaries_only) as feats:
            run_to_last_stage(self._forward_fn(), images)
        return [feats[i] for i in range(len(self.stages))]

    __call__ = forward

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Boundary features of ``images``; inside a running :meth:`session` they pass through it."""
        run = self._hooks.run
        if run is None:
            return self.forward(images)
        stop, run.stop_early = run.stop_early, True
        try:
            run_to_last_stage(self._forward_fn(), images)
        finally:
            run.stop_early = stop
        return [run.features[i] for i in range(len(self.stages))]

    def _forward_fn(self) -> Callable[[torch.Tensor], object]:
        fwd = getattr(self.model, "forward_features", None)
        return fwd if callable(fwd) else self.model

    def remove(self) -> None:
        """Remove the hooks; the model becomes a plain model again (still frozen)."""
        self._hooks.remove()
        if getattr(self.model, "_promptmatch_staged", None) is self:
            del self.model._promptmatch_staged

    def __repr__(self) -> str:
        stages = ", ".join(f"{s.module}(C={s.channels}, /{s.reduction})" for s in self.stages)
        return f"StagedBackbone({type(self.model).__name__}: {stages})"


def stage_backbone(model: nn.Module, **kwargs) -> StagedBackbone:
    """Return the model's existing :class:`StagedBackbone`, or stage it now."""
    existing = getattr(model, "_promptmatch_staged", None)
    if existing is not None:
        if kwargs.get("stage_modules") is not None and list(kwargs["stage_modules"]) != [
            s.module for s in existing.stages
        ]:
            raise ValueError("this backbone is already staged with other stage_modules")
        return existing
    return StagedBackbone(model, **kwargs)
