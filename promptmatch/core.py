"""The prompted core shared by :class:`~promptmatch.PromptSegmentor` and
``promptmatch.PromptEncoderDecoder``: a staged backbone (frozen unless the method trains
it), a tuning method attached between its stages, and what prompt checkpoints need.

:class:`PromptCheckpointable` is the interface checkpoints, the prompt bank and the tools
rely on; :class:`PromptedCore` implements it once for both segmentors.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Set, Tuple, \
    Union, runtime_checkable

import torch
from torch import nn

from .methods import MethodConfig, TuningMethod, build_method, get_method
from .staging import StagedBackbone, stage_backbone

__all__ = ["PromptCheckpointable", "PromptedCore", "trainable_state_dict", "trainable_backbone_keys"]

_logger = logging.getLogger(__name__)


@runtime_checkable
class PromptCheckpointable(Protocol):
    """What a model must offer to be saved and loaded as a prompt checkpoint.

    ``backbone`` is the (frozen) backbone module, ``staged`` its :class:`StagedBackbone`;
    ``describe()`` returns the identity record a checkpoint stores and is checked against;
    ``trainable_state_dict()`` the tensors it holds (everything but frozen backbone weights).
    """

    backbone: nn.Module
    staged: StagedBackbone

    def describe(self) -> Dict[str, Any]: ...

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]: ...


def _backbone_trains_buffers(model: nn.Module) -> bool:
    """Whether the backbone's buffers (BatchNorm statistics) are trained, i.e. it is not frozen."""
    staged = getattr(model, "staged", None)
    return staged is not None and not staged.frozen


def trainable_backbone_keys(model: nn.Module) -> Set[str]:
    """The state_dict keys of ``model.backbone`` that train: parameters with ``requires_grad``
    and, for a backbone that is not frozen, its buffers."""
    backbone = model.backbone
    keys = {n for n, p in backbone.named_parameters() if p.requires_grad}
    if _backbone_trains_buffers(model):
        keys |= {n for n, _ in backbone.named_buffers()}
    return keys


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every state_dict entry of ``model`` except the frozen weights of ``model.backbone``.

    Trainable backbone parameters (and, for a backbone that is not frozen, its buffers) are
    included: a prompt checkpoint of full fine-tuning holds the whole backbone.
    """
    trainable_backbone = {f"backbone.{n}" for n in trainable_backbone_keys(model)}
    return {
        k: v for k, v in model.state_dict().items() if not k.startswith("backbone.") or k in trainable_backbone
    }


def _freeze_unreached(staged: StagedBackbone, method: str) -> None:
    """Freeze the backbone parameters a method made trainable that the staged forward never
    reaches (e.g. a ViT's final norm under ``bitfit`` or ``full``: the forward ends at the last
    stage): they would never get a gradient, the optimiser would carry them for nothing, and
    DDP fails at its second iteration on a trainable parameter without one."""
    unreached = staged.unreached_parameters()
    for _, p in unreached:
        p.requires_grad_(False)
    if unreached:
        names = [n for n, _ in unreached]
        _logger.info("%s: %d backbone parameter(s) after the last stage stay frozen (no gradient reaches them): %s",
                     method, len(names), ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))


class PromptedCore:
    """Mixin for an ``nn.Module`` with a ``backbone``: staging, the method, the prompted
    forward, frozen training mode, trainable parameters and state.

    Subclasses call :meth:`_init_prompted` in their constructor (after ``backbone`` is set)
    and implement ``describe()``.
    """

    staged: StagedBackbone
    method: TuningMethod
    method_name: str

    def _init_prompted(
        self,
        backbone: nn.Module,
        method: str,
        num_classes: int,
        method_cfg: Optional[Union[MethodConfig, Mapping[str, Any]]] = None,
        *,
        stage_modules: Optional[Sequence[str]] = None,
        num_stages: Optional[int] = None,
        probe_size: Optional[Tuple[int, int]] = None,
        method_root: Optional[nn.Module] = None,
        method_prefix: str = "",
        then: Optional[Callable[[], None]] = None,
        adopt_unfrozen: bool = False,
    ) -> None:
        """Stage ``backbone``, build ``method`` and attach it; if anything here (or ``then``,
        the rest of the subclass's construction) fails, the method is detached (where it can
        be), the staging hooks are removed and the backbone's ``requires_grad`` flags restored.

        ``method_root``/``method_prefix``: the module the method attaches to, when it is
        inside ``backbone`` (e.g. the timm model of an mmseg wrapper) and the prefix of its
        name to strip from stage module names. ``adopt_unfrozen``: a backbone that staged
        itself unfrozen (``promptmatch.TimmBackbone``) is frozen here if the method freezes;
        otherwise an already staged backbone must be frozen exactly when the method freezes it
        (a backbone shared between segmentors cannot be both).
        """
        method_cls = get_method(method)
        newly_staged = getattr(backbone, "_promptmatch_staged", None) is None
        grad_flags = [(p, p.requires_grad) for p in backbone.parameters()]
        kwargs: Dict[str, Any] = {"stage_modules": stage_modules, "num_stages": num_stages,
                                  "freeze": method_cls.freezes_backbone}
        if probe_size is not None:
            kwargs["probe_size"] = probe_size
        staged = stage_backbone(backbone, **kwargs)
        attached: Optional[TuningMethod] = None
        try:
            if staged.frozen != method_cls.freezes_backbone and not (adopt_unfrozen and not staged.frozen):
                raise ValueError(
                    f"method {method!r} {'freezes' if method_cls.freezes_backbone else 'trains'} the backbone, but "
                    "this backbone is shared with a segmentor that does the opposite"
                )
            if method_cls.freezes_backbone:
                staged.freeze()
            object.__setattr__(self, "staged", staged)  # plain attribute, not a submodule
            stages = staged.stages
            if method_prefix:
                stages = tuple(dataclasses.replace(st, module=st.module[len(method_prefix):]) for st in stages)
            self.method_name = method
            self.method = build_method(method, stages, num_classes, method_cfg)
            self.method.attach(method_root if method_root is not None else backbone)
            attached = self.method
            _freeze_unreached(staged, method)
            if then is not None:
                then()
        except BaseException:
            if attached is not None and hasattr(attached, "detach"):
                try:
                    attached.detach()
                except Exception:  # pragma: no cover - best effort: the original error matters
                    pass
            if newly_staged:
                staged.remove()
                for p, flag in grad_flags:  # e.g. bitfit/full switched parts of it on
                    p.requires_grad_(flag)
            raise

    # ---------------------------------------------------------------- modes
    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)  # type: ignore[misc]
        self.staged.keep_frozen()
        return self

    # -------------------------------------------------------------- forward
    def _boundary_fn(self, state: Dict[str, Any]) -> Callable[[int, torch.Tensor], Any]:
        method = self.method
        return lambda i, f: method.boundary(i, f, state)

    def _refuse_replica(self) -> None:
        if getattr(self, "_is_replica", False):  # set by torch's replicate(), i.e. nn.DataParallel
            raise RuntimeError(
                f"{type(self).__name__} cannot run under torch.nn.DataParallel: its replicas would "
                "share the original's staged backbone (its hooks, run state and devices). Use "
                "torch.nn.parallel.DistributedDataParallel, one process per GPU (mmseg: "
                "model_wrapper_cfg=dict(type='promptmatch.PromptDistributedDataParallel')), or a "
                "single device.")

    def prompted_features(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
        """Boundary features after the method acted on them, and the method's per-pass state."""
        self._refuse_replica()
        state = self.method.init_state()
        with self.method.acting():
            feats = self.staged.forward(images, on_boundary=self._boundary_fn(state),
                                        autograd_from_start=self.method.trains_inside_backbone,
                                        autograd_at_boundaries_only=not self.method.grad_crosses_backbone)
        return feats, state

    @contextmanager
    def prompted_session(self, images: torch.Tensor) -> Iterator[Dict[str, Any]]:
        """Within the block, calling the backbone runs it with the method between its stages;
        yields the method's per-pass state (interim maps)."""
        self._refuse_replica()
        state = self.method.init_state()
        with self.method.acting(), self.staged.session(
                images, on_boundary=self._boundary_fn(state),
                autograd_from_start=self.method.trains_inside_backbone,
                autograd_at_boundaries_only=not self.method.grad_crosses_backbone):
            yield state

    # ------------------------------------------------------- trainable parts
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """What a prompt checkpoint holds: every entry of the state_dict except frozen backbone weights."""
        return trainable_state_dict(self)  # type: ignore[arg-type]

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters that train (matchers, heads; the backbone too for ``full``)."""
        return [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]

    def trainable_buffers(self) -> List[torch.Tensor]:
        """The buffers that training changes and checkpoints hold (BatchNorm statistics of heads
        and matchers; of the backbone too when it is not frozen)."""
        from .divergence import trainable_buffers

        return trainable_buffers(self)  # type: ignore[arg-type]

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> List[Dict[str, Any]]:
        """Optimiser parameter groups of the trainable parameters: trainable backbone
        parameters at ``lr * method.backbone_lr_mult``, the rest at ``lr``."""
        backbone = self.backbone  # type: ignore[attr-defined]
        backbone_ids = {id(p) for p in backbone.parameters()}
        groups = [
            {"params": [p for p in backbone.parameters() if p.requires_grad],
             "lr": lr * self.method.backbone_lr_mult, "weight_decay": weight_decay, "name": "backbone"},
            {"params": [p for p in self.trainable_parameters() if id(p) not in backbone_ids],
             "lr": lr, "weight_decay": weight_decay, "name": "prompts_and_head"},
        ]
        return [g for g in groups if g["params"]]
