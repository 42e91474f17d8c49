"""Staged view of a frozen timm (or any) backbone.

A :class:`StagedBackbone` splits a model into stages at named modules (taken from
timm's ``feature_info`` or given by hand), freezes it, and lets a caller read and
*replace* the output of every stage boundary as an NCHW map while the model runs:
the replaced features are what the next stage receives.
"""
from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Stage", "StagedBackbone", "freeze_module", "stage_backbone"]

_logger = logging.getLogger(__name__)

BoundaryFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One stage of a staged backbone; its boundary is the output of ``module``."""

    index: int
    module: str
    channels: int
    reduction: int


class _StopForward(Exception):
    """Raised by the last boundary hook: nothing after the last stage is needed."""


@dataclass
class _Run:
    callback: Optional[BoundaryFn]
    height: int
    width: int
    features: Dict[int, torch.Tensor]
    grad_from_first: bool = False
    stop_early: bool = True


def freeze_module(module: nn.Module) -> None:
    """Turn off gradients for every parameter of ``module`` and put it in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _module_path_exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The patch size input sides must be multiples of (timm PatchEmbed without padding)."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None or getattr(pe, "dynamic_img_pad", True):
        return None  # overlapping / padding patch embeddings (PVTv2, ...) take any size
    if isinstance(ps, int):
        return (ps, ps)
    return tuple(int(v) for v in ps)  # type: ignore[return-value]


def _fixed_img_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The one input size a token model accepts, or None if it takes any size."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return None
    if getattr(model, "dynamic_img_size", False):
        return None
    if not getattr(pe, "strict_img_size", False):
        return None
    size = getattr(pe, "img_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1]))


def _token_stride(length: int, size: Tuple[int, int]) -> int:
    """Stride of a token sequence of ``length`` for an input of ``size`` (up to 16 prefix tokens)."""
    h, w = size
    for prefix in range(0, 17):
        n = length - prefix
        if n <= 0:
            break
        r = round((h * w / n) ** 0.5)
        if r >= 1 and -(-h // r) * -(-w // r) == n:
            return r
    raise ValueError(f"cannot tell the stride of {length} tokens for a {h}x{w} input")


def _describe_output(out) -> str:
    """What a module returned, in words: 'a list of 2 tensors', 'a dict with keys [...]', 'None'."""
    if out is None:
        return "None"
    if isinstance(out, (list, tuple)):
        kind = type(out).__name__
        if out and all(isinstance(o, torch.Tensor) for o in out):
            return f"a {kind} of {len(out)} tensor{'s' if len(out) != 1 else ''}"
        return f"a {kind} of {len(out)} item{'s' if len(out) != 1 else ''} ({', '.join(type(o).__name__ for o in out[:4])}{', ...' if len(out) > 4 else ''})"
    if isinstance(out, dict):
        return f"a {type(out).__name__} with keys {list(out)[:6]}"
    return f"a {type(out).__name__}"


def _not_one_tensor_error(model: nn.Module, name: str, out) -> ValueError:
    """The build-time error for a stage module whose output is not one tensor."""
    try:
        kind = type(model.get_submodule(name)).__name__
    except AttributeError:  # pragma: no cover - names are checked before
        kind = "module"
    return ValueError(
        f"stage module {name!r} ({kind} in {type(model).__name__}) returns {_describe_output(out)}, not one "
        "tensor, so it cannot end a stage: the matcher replaces a stage's output tensor. Give "
        "stage_modules=[...] naming modules that each return one tensor (e.g. one module per branch "
        f"inside {name!r}; see model.named_modules()). Multi-branch backbones get such stages by default "
        "(stage_modules=None) for timm's HighResolutionNet (its incre_modules) and mmseg's HRNet (the "
        "branches of its last module)."
    )


def _feature_module_aliases(model: nn.Module) -> Dict[str, str]:
    """``feature_info`` module names that do not name the module producing the feature -> the one that does.

    timm's HighResolutionNet lists its four branch features as 'stage1'..'stage4' (taken after the
    channel-increasing ``incre_modules``); its modules 'stage2'..'stage4' are the multi-branch stages
    and return lists. The features are the outputs of ``incre_modules.<i>``, one tensor each.
    """
    hrnet = sys.modules.get("timm.models.hrnet")  # imported already if the model is one
    cls = getattr(hrnet, "HighResolutionNet", None)
    if cls is None:
        return {}
    aliases: Dict[str, str] = {}
    for prefix, mod in model.named_modules():
        incre = getattr(mod, "incre_modules", None)
        if isinstance(mod, cls) and isinstance(incre, nn.ModuleList):
            p = f"{prefix}." if prefix else ""
            for i in range(len(incre)):
                aliases[f"{p}stage{i + 1}"] = f"{p}incre_modules.{i}"
    return aliases


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
        self.patch_size = _patch_size(model)
        self.fixed_img_size = _fixed_img_size(model)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.native_fmt = str(getattr(model, "output_fmt", "NCHW"))
        self.probe_size = (int(probe_size[0]), int(probe_size[1]))
        self.stages: Tuple[Stage, ...] = self._resolve_stages(stage_modules, num_stages, min_reduction)
        self._run: Optional[_Run] = None
        self._layouts: Dict[int, str] = {}
        self._handles = []
        for stage in self.stages:
            mod = model.get_submodule(stage.module)
            self._handles.append(mod.register_forward_hook(self._make_hook(stage.index)))
        if freeze:
            freeze_module(model)
        self.frozen = freeze
        self._disable_grad_checkpointing()
        model._promptmatch_staged = self  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ stages
    def _resolve_stages(
        self, stage_modules: Optional[Sequence[str]], num_stages: Optional[int], min_reduction: int
    ) -> Tuple[Stage, ...]:
        model = self.model
        info = getattr(model, "feature_info", None)
        by_module: Dict[str, dict] = {}
        if isinstance(info, (list, tuple)) and all(isinstance(f, dict) and "module" in f for f in info):
            by_module = {f["module"]: f for f in info}
        elif info is not None and hasattr(info, "info"):  # timm FeatureInfo object
            by_module = {f["module"]: f for f in info.info}
        aliases = _feature_module_aliases(model) if by_module else {}
        if aliases:
            by_module = {aliases.get(k, k): dict(f, module=aliases.get(k, k)) for k, f in by_module.items()}

        if stage_modules is not None:
            names = list(stage_modules)
            if not names:
                raise ValueError("stage_modules is empty: give at least one module name")
            missing = [n for n in names if not _module_path_exists(model, n)]
            if missing:
                raise ValueError(
                    f"stage_modules {missing} are not submodules of {type(model).__name__}; "
                    "use names from model.named_modules()"
                )
            stages = []
            for i, n in enumerate(names):
                f = by_module.get(n, {})
                stages.append(Stage(i, n, int(f.get("num_chs", 0)), int(f.get("reduction", 0))))
            if any(s.channels <= 0 or s.reduction <= 0 for s in stages):
                return tuple(self._probe_stages(stages))
            self._probe(stages, strict=False)
            return tuple(stages)

        if not by_module:
            raise ValueError(
                f"{type(model).__name__} has no usable `feature_info` (a list of dicts with "
                "'module', 'num_chs' and 'reduction'), so its stages cannot be found. Pass the "
                "names of the modules that end each stage explicitly, e.g. "
                "stage_modules=['layer1', 'layer2', 'layer3', 'layer4']"
            )
        entries = [f for f in by_module.values() if _module_path_exists(model, f["module"])]
        if not entries:
            raise ValueError(
                f"the modules named in {type(model).__name__}.feature_info do not exist in the model "
                "(a features_only wrapper renames them); pass the plain model or give stage_modules"
            )
        reductions = {int(f["reduction"]) for f in entries}
        if len(reductions) == 1 and len(entries) > 1:
            # plain (isotropic) ViT: every block is a boundary at the same stride; group them
            n = num_stages or min(4, len(entries))
            if not 1 <= n <= len(entries):
                raise ValueError(f"num_stages must be in [1, {len(entries)}] for this model, got {n}")
            ends = [-(-(i + 1) * len(entries) // n) - 1 for i in range(n)]  # ceil: last block ends the last group
            entries = [entries[e] for e in ends]
        else:
            if num_stages is not None:
                raise ValueError(
                    "num_stages only applies to plain ViTs whose blocks all share one stride; "
                    "for hierarchical backbones pass stage_modules to choose boundaries"
                )
            kept = [f for f in entries if int(f["reduction"]) >= min_reduction]
            entries = kept or entries[-1:]
        stages = [Stage(i, f["module"], int(f["num_chs"]), int(f["reduction"])) for i, f in enumerate(entries)]
        self._probe(stages, strict=False)
        return tuple(stages)

    def _probe_sizes(self, stages: Sequence[Stage], strict: bool) -> List[Tuple[int, int]]:
        """Input sizes the build-time probe tries, in order."""
        if self.fixed_img_size is not None:
            return [self.fixed_img_size]
        if strict or any(s.reduction <= 0 for s in stages):
            return [self.probe_size]
        # strides are known: a small input (a multiple of the largest stride and of the patch)
        # is enough to see what each stage module returns, and costs little
        step = max(s.reduction for s in stages)
        if self.patch_size is not None:
            step = math.lcm(step, *self.patch_size)
        side = step * max(2, -(-64 // step))  # at least 64 px and two cells of the largest stride
        small = (side, side)
        return [small] if small == self.probe_size else [small, self.probe_size]

    def _probe(self, stages: Sequence[Stage], strict: bool = True) -> Dict[str, object]:
        """A no-grad forward pass at build time that records what each stage module returns.

        A stage module that returns anything but one 3-d or 4-d tensor (a list of branch maps,
        a tuple, a dict) is refused here, when the model is built, with a :class:`ValueError`
        that says what it returned and what to do, instead of at the first forward. The pass
        stops once every stage module has run. With ``strict=False`` (stages from
        ``feature_info``, channels and strides already known) the pass runs on a small input
        first (then on ``probe_size``), and a pass that fails for another reason (an input
        size this model cannot take) is not an error; the stages seen before it are checked.
        """
        outs: Dict[str, object] = {}
        wanted = {s.module for s in stages}

        def record(name: str):
            def hook(module, args, output):
                outs.setdefault(name, output)
                if len(outs) == len(wanted):
                    raise _StopForward()

            return hook

        hooks = [self.model.get_submodule(n).register_forward_hook(record(n)) for n in wanted]
        was_training = self.model.training
        self.model.eval()
        failure: Optional[BaseException] = None
        try:
            ref = next(iter(self.model.parameters()), None)
            fwd = getattr(self.model, "forward_features", self.model)
            for size in self._probe_sizes(stages, strict):
                outs.clear()
                failure = None
                x = torch.zeros(1, 3, *size) if ref is None else torch.zeros(1, 3, *size, device=ref.device, dtype=ref.dtype)
                try:
                    with torch.no_grad():
                        fwd(x)
                except _StopForward:
                    pass
                except Exception as e:  # checked below: a multi-output stage seen before it is the clearer error
                    failure = e
                    _logger.debug("probe forward pass of %s at %s failed: %r", type(self.model).__name__, size, e)
                if failure is None or any(not isinstance(o, torch.Tensor) for o in outs.values()):
                    break
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        for s in stages:
            if s.module not in outs:
                continue
            out = outs[s.module]
            if not isinstance(out, torch.Tensor):
                raise _not_one_tensor_error(self.model, s.module, out)
            if out.ndim not in (3, 4):
                raise ValueError(
                    f"stage module {s.module!r} returns a {out.ndim}-d tensor {tuple(out.shape)}; a stage must "
                    "end at a module returning tokens (N, L, C) or a map (N, C, H, W) / (N, H, W, C)"
                )
        if failure is not None:
            if strict:
                raise failure
            return outs
        missing = [s.module for s in stages if s.module not in outs]
        if missing:
            raise ValueError(
                f"a forward pass of {type(self.model).__name__} never runs the stage modules {missing}; "
                "name modules that its forward_features (or forward) calls"
            )
        return outs

    def _probe_stages(self, stages: List[Stage]) -> List[Stage]:
        """Find channels and strides of hand-named stages by one small forward pass."""
        size = self.fixed_img_size or self.probe_size
        outs = self._probe(stages, strict=True)
        probed = []
        for s in stages:
            out = outs[s.module]
            assert isinstance(out, torch.Tensor)
            if out.ndim == 4:
                hw = out.shape[2:] if self.native_fmt != "NHWC" else out.shape[1:3]
                ch = out.shape[1] if self.native_fmt != "NHWC" else out.shape[3]
                red = max(1, round(size[0] / hw[0]))
            elif out.ndim == 3:
                ch = out.shape[2]
                red = _token_stride(out.shape[1], size)
            probed.append(Stage(s.index, s.module, int(ch), int(red)))
        return probed

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

    # -------------------------------------------------------------- validation
    def check_input(self, images: torch.Tensor) -> None:
        """Raise a clear error if ``images`` cannot go through this backbone."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got a {images.ndim}-d tensor {tuple(images.shape)}")
        in_chans = self.in_chans
        if in_chans is not None and images.shape[1] != in_chans:
            raise ValueError(
                f"images have {images.shape[1]} channels but the backbone expects {in_chans} "
                "(pass RGB images as (N, 3, H, W))"
            )
        h, w = int(images.shape[2]), int(images.shape[3])
        if self.fixed_img_size is not None and (h, w) != self.fixed_img_size:
            raise ValueError(
                f"this backbone was built for {self.fixed_img_size[0]}x{self.fixed_img_size[1]} inputs only, got "
                f"{h}x{w}; create it with dynamic_img_size=True (promptmatch.create_backbone does) to "
                "segment crops of other sizes"
            )
        if self.patch_size is not None:
            ph, pw = self.patch_size
            if h % ph or w % pw:
                raise ValueError(
                    f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}; "
                    f"use crops whose sides are multiples of {ph} (e.g. {max(ph, h // ph * ph)}x{max(pw, w // pw * pw)})"
                )
        max_red = max(s.reduction for s in self.stages)
        if h < max_red or w < max_red:
            raise ValueError(
                f"image size {h}x{w} is smaller than the backbone's largest stride {max_red}; "
                f"use images of at least {max_red}x{max_red}"
            )

    @property
    def in_chans(self) -> Optional[int]:
        pe = getattr(self.model, "patch_embed", None)
        proj = getattr(pe, "proj", None)
        if isinstance(proj, nn.Conv2d):
            return proj.in_channels
        pcfg = getattr(self.model, "pretrained_cfg", None) or {}
        size = pcfg.get("input_size") if isinstance(pcfg, dict) else None
        if size:
            return int(size[0])
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return None

    # ------------------------------------------------------------------ layout
    def _layout(self, index: int, out: torch.Tensor, height: int, width: int) -> str:
        known = self._layouts.get(index)
        if known is not None:
            return known
        stage = self.stages[index]
        if out.ndim == 3:
            layout = "NLC"
        elif out.ndim == 4:
            c = stage.channels
            first, last = out.shape[1] == c, out.shape[3] == c
            if first and not last:
                layout = "NCHW"
            elif last and not first:
                layout = "NHWC"
            else:
                layout = "NHWC" if self.native_fmt == "NHWC" else "NCHW"
        else:
            raise RuntimeError(
                f"stage {index} ({stage.module}) returned a {out.ndim}-d tensor; expected tokens "
                "(N, L, C) or a map (N, C, H, W) / (N, H, W, C)"
            )
        self._layouts[index] = layout
        return layout

    def _to_map(self, index: int, out: torch.Tensor, height: int, width: int):
        """NCHW view of a boundary's output and a function mapping an NCHW map back."""
        layout = self._layout(index, out, height, width)
        if layout == "NCHW":
            return out, lambda m: m
        if layout == "NHWC":
            return out.permute(0, 3, 1, 2), lambda m: m.permute(0, 2, 3, 1)
        # tokens: prefix tokens (cls, registers) kept aside, the rest reshaped to the patch grid
        red = self.stages[index].reduction
        n, length, c = out.shape
        gh, gw = height // red, width // red
        if length < gh * gw or length - gh * gw > 16:
            gh, gw = -(-height // red), -(-width // red)  # patch embeddings that pad the input
        prefix = length - gh * gw
        if prefix < 0:
            raise RuntimeError(
                f"stage {index} ({self.stages[index].module}) has {length} tokens, fewer than the "
                f"{gh}x{gw} patch grid of a {height}x{width} image"
            )
        head, body = out[:, :prefix], out[:, prefix:]
        fmap = body.transpose(1, 2).reshape(n, c, gh, gw)

        def back(m: torch.Tensor) -> torch.Tensor:
            return torch.cat([head, m.flatten(2).transpose(1, 2)], dim=1)

        return fmap, back

    # ------------------------------------------------------------------- hooks
    def _make_hook(self, index: int):
        def hook(module: nn.Module, args, output):
            run = self._run
            if run is None:
                return None
            if not isinstance(output, torch.Tensor):  # normally refused at build time (probe)
                raise RuntimeError(str(_not_one_tensor_error(self.model, self.stages[index].module, output)))
            fmap, back = self._to_map(index, output, run.height, run.width)
            replaced = None
            if run.callback is not None:
                if run.grad_from_first and not torch.is_grad_enabled():
                    torch.set_grad_enabled(True)
                new = run.callback(index, fmap)
                if new is not fmap:
                    if new.shape != fmap.shape:
                        raise RuntimeError(
                            f"boundary {index} replacement has shape {tuple(new.shape)}, "
                            f"expected {tuple(fmap.shape)}"
                        )
                    fmap = new
                    replaced = back(new)
            run.features[index] = fmap
            if run.stop_early and index == len(self.stages) - 1:
                raise _StopForward()
            return replaced

        return hook

    # ----------------------------------------------------------------- forward
    @contextmanager
    def session(
        self,
        images: torch.Tensor,
        on_boundary: Optional[BoundaryFn] = None,
        stop_early: bool = False,
        autograd_from_start: bool = False,
    ) -> Iterator[Dict[int, torch.Tensor]]:
        """Make the boundary hooks active while the caller runs the model on ``images``.

        Yields the dict that collects each boundary's (possibly replaced) NCHW features.
        ``on_boundary(index, features)`` may return replacement features of the same shape;
        they are fed to the next stage. With ``stop_early`` the pass ends at the last
        boundary (callers must then run the model inside :meth:`forward`). Stages before the
        first boundary run without autograd when the backbone is frozen, unless
        ``autograd_from_start`` (a method trains parameters inside those stages) or some
        backbone parameter requires grad.
        """
        if self._run is not None:
            raise RuntimeError("a StagedBackbone session is already running (sessions do not nest)")
        self.keep_frozen()
        if getattr(self.model, "grad_checkpointing", False):
            self._disable_grad_checkpointing()
        grad_mode = torch.is_grad_enabled()
        run = _Run(on_boundary, int(images.shape[-2]), int(images.shape[-1]), {}, stop_early=stop_early)
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
            run.grad_from_first = True
            torch.set_grad_enabled(False)
        self._run = run
        try:
            yield run.features
        finally:
            self._run = None
            torch.set_grad_enabled(grad_mode)
        if len(run.features) != len(self.stages):
            missing = [self.stages[i].module for i in range(len(self.stages)) if i not in run.features]
            raise RuntimeError(f"the forward pass never reached stage modules {missing}")

    @property
    def active(self) -> bool:
        """Whether a session is running."""
        return self._run is not None

    def forward(
        self,
        images: torch.Tensor,
        on_boundary: Optional[BoundaryFn] = None,
        check: bool = True,
        autograd_from_start: bool = False,
    ) -> List[torch.Tensor]:
        """Run the backbone up to its last stage and return every boundary's NCHW features.

        ``on_boundary(index, features)`` may return replacement features of the same
        shape; they are fed to the next stage and returned in place of the originals.
        """
        if check:
            self.check_input(images)
        fwd = getattr(self.model, "forward_features", None)
        with self.session(images, on_boundary, stop_early=True, autograd_from_start=autograd_from_start) as feats:
            try:
                (fwd if callable(fwd) else self.model)(images)
            except _StopForward:
                pass
        return [feats[i] for i in range(len(self.stages))]

    __call__ = forward

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Boundary features of ``images``; inside a running :meth:`session` they pass through it."""
        run = self._run
        if run is None:
            return self.forward(images)
        fwd = getattr(self.model, "forward_features", None)
        stop, run.stop_early = run.stop_early, True
        try:
            (fwd if callable(fwd) else self.model)(images)
        except _StopForward:
            pass
        finally:
            run.stop_early = stop
        return [run.features[i] for i in range(len(self.stages))]

    def remove(self) -> None:
        """Remove the hooks; the model becomes a plain model again (still frozen)."""
        for h in self._handles:
            h.remove()
        self._handles = []
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
