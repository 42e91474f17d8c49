"""``promptmatch.PromptEncoderDecoder``: any mmseg EncoderDecoder config, prompt-tuned.

One added line turns an mmseg 1.x config into SPM prompt tuning::

    _base_ = ['mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py']
    model = dict(type='promptmatch.PromptEncoderDecoder')

The config's backbone is built and its pretrained weights load as usual (``init_cfg``);
it is then frozen, split into stages and given matchers. Heads stay trainable, and the
interim-map losses join the decode and auxiliary losses.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmseg.models.segmentors import EncoderDecoder
from torch import Tensor, nn

from ..checkpoint import backbone_architecture, describe_model
from ..core import PromptedCore
from ..divergence import DivergenceError, DivergenceGuard, check_max_bad_steps
from ..methods import MethodConfig, MethodNotApplicableError, get_method, interim_losses
from ..params import parameter_report
from ..registry import MODELS
from ..staging import group_blocks
from ._output_probe import probe_outputs

__all__ = ["PromptEncoderDecoder", "default_stage_modules", "SUPPORTED_BACKBONES"]

SUPPORTED_BACKBONES = (
    "ResNet", "ResNetV1c", "ResNetV1d", "VisionTransformer", "BEiT", "MAE", "SwinTransformer",
    "MixVisionTransformer", "HRNet", "promptmatch.TimmBackbone",
)


def _log_warning(msg: str) -> None:
    print_log(f"promptmatch: {msg}", logger="current", level=logging.WARNING)


def default_stage_modules(
    backbone: nn.Module, num_stages: Optional[int] = None
) -> Tuple[Optional[List[str]], Tuple[int, int]]:
    """Stage-ending module names of a known mmseg backbone and a size to probe it at.

    Returns ``(None, size)`` for backbones that describe their stages with
    ``feature_info`` (promptmatch.TimmBackbone).
    """
    name = type(backbone).__name__
    if getattr(backbone, "feature_info", None) is not None:
        return None, (224, 224)
    size = getattr(backbone, "img_size", None) or getattr(backbone, "pretrain_img_size", None) or 224
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if hasattr(backbone, "res_layers"):  # ResNet, ResNetV1c, ResNetV1d, ResNeXt, ...
        return list(backbone.res_layers), (224, 224)
    if name in ("VisionTransformer", "BEiT", "MAE"):
        return [f"layers.{i}" for i in group_blocks(len(backbone.layers), num_stages)], size
    if name == "SwinTransformer":
        return [f"stages.{i}.blocks.{len(s.blocks) - 1}" for i, s in enumerate(backbone.stages)], size
    if name == "MixVisionTransformer":
        return [f"layers.{i}.2" for i in range(len(backbone.layers))], (224, 224)
    if name == "HRNet":
        # its stages return lists of branch maps; the stage ends are the branches of the last
        # HRModule (one tensor each, strides 4..32), before its fuse layers mix them into the
        # maps the backbone returns
        last = len(backbone.stage4) - 1
        return [f"stage4.{last}.branches.{i}" for i in range(len(backbone.stage4[last].branches))], (224, 224)
    raise ValueError(
        f"promptmatch does not know how to split the mmseg backbone {name!r} into stages. "
        f"Supported types: {', '.join(SUPPORTED_BACKBONES)}. For another backbone, give the "
        "names of the modules that end its stages (each returning one tensor) in the config: "
        "model = dict(type='promptmatch.PromptEncoderDecoder', stage_modules=['layer1', ...])"
    )


class _LeanUnreachable(Exception):
    """The backbone's outputs are computed after its last stage: lean mode cannot train."""


def _linked(x: Any) -> bool:
    """Whether any tensor output has an autograd history (a view made without autograd still
    reports ``requires_grad`` but has no ``grad_fn``)."""
    return any(t.requires_grad and t.grad_fn is not None
               for t in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(t, Tensor))


@MODELS.register_module()
class PromptEncoderDecoder(PromptedCore, EncoderDecoder):
    """An mmseg ``EncoderDecoder`` whose backbone is frozen and prompt-tuned.

    Args (besides those of ``EncoderDecoder``):
        method: tuning method name (``'spm'``).
        method_cfg: the method's config as a dict (e.g. ``dict(hidden_dim=64)``).
        stage_modules: names of the backbone modules that end its stages (default: known
            per backbone type, or timm's ``feature_info``).
        num_stages: number of block groups for plain ViTs (default 4).
        class_names: stored in prompt checkpoints (the tools fill it from the dataset).
        max_bad_steps: training iterations with a non-finite loss or gradient to skip (no
            update) before stopping with :class:`~promptmatch.DivergenceError`; ``0`` (the
            default) stops at the first. Training only; not part of the checkpoint identity.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        decode_head: Mapping[str, Any],
        method: str = "spm",
        method_cfg: Optional[Union[MethodConfig, Mapping[str, Any]]] = None,
        stage_modules: Optional[Sequence[str]] = None,
        num_stages: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        max_bad_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        method_cls = get_method(method)  # fail on a bad name before building anything
        check_max_bad_steps(max_bad_steps, "PromptEncoderDecoder: max_bad_steps")
        super().__init__(backbone=backbone, decode_head=decode_head, **kwargs)
        from .timm_backbone import TimmBackbone

        is_timm = isinstance(self.backbone, TimmBackbone)
        if method_cls.renames_backbone_keys and not is_timm:
            raise MethodNotApplicableError(
                f"method {method!r} renames the backbone's state_dict keys, so the pretrained weights that "
                f"mmseg loads later through init_cfg would miss them; use backbone type "
                "'promptmatch.TimmBackbone' (its weights load when it is built) or the Python API"
            )
        if stage_modules is None:
            names, probe = default_stage_modules(self.backbone, num_stages)
        else:
            names, probe = list(stage_modules), (224, 224)

        def check_stage_count() -> None:
            if num_stages is not None and len(self.staged.stages) != num_stages:
                raise ValueError(
                    f"num_stages={num_stages} on the model, but the backbone is already split into "
                    f"{len(self.staged.stages)} stages; set num_stages on the backbone "
                    "(promptmatch.TimmBackbone(num_stages=...)) instead"
                )

        cfg = method_cfg.to_dict() if isinstance(method_cfg, MethodConfig) else dict(method_cfg or {})
        # SPM's default lean mode needs the backbone to return its last stage's output itself; on
        # one that computes its outputs after the last stage (a final norm or reshape: mmseg's
        # ViT, BEiT, MAE, Swin, MiT) it could not train, so unless the config chose, the model
        # backpropagates through the backbone there instead (v4's other settings kept)
        auto_lean = "backprop_backbone" in method_cls.config_class.field_names() and "backprop_backbone" not in cfg

        def finish(probe_lean: bool) -> None:
            check_stage_count()
            # Prompts meant for the decoder alone (SPM's observers) reach the head only where the
            # backbone returns a stage's output as it is (ResNets, most timm CNNs); mmseg's
            # transformers reshape and normalise it first, so the head does not read the tensor
            # a matcher saw. In lean mode (no other way for an early matcher to act) the levels
            # returned as they are get their prompts; otherwise (v3 and before, whose prompt
            # checkpoints have none) they are left out and the method acts through the backbone
            reads: Tuple[int, ...] = ()
            if not self.method.grad_crosses_backbone:
                reads, last_returned = probe_outputs(self)
                if probe_lean and not last_returned:
                    raise _LeanUnreachable
            self.method.decoder_reads(reads)

        def build(probe_lean: bool) -> None:
            # the method acts on the timm model itself for a TimmBackbone: stage names relative to it
            self._init_prompted(self.backbone, method, self.num_classes, cfg, stage_modules=names,
                                num_stages=num_stages if names is None else None, probe_size=probe,
                                method_root=self.backbone.model if is_timm else None,
                                method_prefix="model." if is_timm else "", then=lambda: finish(probe_lean),
                                adopt_unfrozen=is_timm)

        try:
            build(auto_lean)
        except _LeanUnreachable:
            print_log(
                f"promptmatch: {type(self.backbone).__name__} computes its outputs after its last stage, "
                f"where {method}'s lean mode (the default) could not train; backpropagating through the "
                "backbone instead (method_cfg=dict(backprop_backbone=True) says so and silences this)",
                logger="current", level=logging.INFO)
            cfg["backprop_backbone"] = True
            build(False)
        staged = self.staged
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = int(getattr(self.decode_head, "ignore_index", 255))
        self.divergence_guard = DivergenceGuard(
            max_bad_steps, where="training",
            hint="lower the learning rate (optim_wrapper.optimizer.lr), or let a few bad iterations be skipped "
                 "with model.max_bad_steps=N",
            log=_log_warning)
        self._guarded_step = False
        self._identity_published = False
        rep = parameter_report(self)
        print_log(
            f"promptmatch: {method} on {type(self.backbone).__name__} stages "
            f"{[s.module for s in staged.stages]}; trainable {rep.trainable:,} / frozen {rep.frozen:,} "
            f"parameters ({rep.percent_of_backbone(rep.trainable):.2f}% of the backbone)",
            logger="current",
            level=logging.INFO,
        )

    # ---------------------------------------------------------------- modes
    def init_weights(self) -> None:
        super().init_weights()
        self.staged.keep_frozen()  # whatever an init_cfg did, a frozen backbone stays in eval

    # ------------------------------------------------------------- training
    def train_step(self, data: Any, optim_wrapper: Any) -> Dict[str, Tensor]:
        """mmengine's train step, with a non-finite loss or gradient stopped (or skipped)
        before the optimiser step; see :mod:`promptmatch.mmseg.guard`."""
        from .guard import guarded_train_step

        return guarded_train_step(self, self, data, optim_wrapper)

    def parse_losses(self, losses: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Tensor]]:
        parsed, log_vars = super().parse_losses(losses)
        if not self._guarded_step and self.training and not self.divergence_guard.loss_finite(parsed):
            # a caller that updates right after (mmengine's own DDP wrapper): stop before it does
            from .guard import current_iter

            it = current_iter(default=-1)
            raise DivergenceError(
                f"training diverged at iteration {it}: the loss is {float(parsed)}; stopped before the update. "
                "Lower the learning rate. (Skipping bad iterations needs the model's own train step: under "
                "several processes use model_wrapper_cfg=dict(type='promptmatch.PromptDistributedDataParallel').)",
                step=it, loss=float(parsed), lr=None, skipped=[], reason="loss")
        return parsed, log_vars

    # -------------------------------------------------------------- forward
    def _backbone_with_prompts(self, inputs: Tensor) -> Tuple[Any, Dict[str, Any]]:
        with self.prompted_session(inputs) as state:
            x = self.backbone(inputs)
        if (not self.method.grad_crosses_backbone and torch.is_grad_enabled() and self.training
                and not _linked(x)):
            raise RuntimeError(
                f"{type(self.backbone).__name__} returns features computed after its last stage (a final "
                "norm or reshape, run without autograd in SPM's lean mode), so no gradient would reach the "
                "matchers: use promptmatch.TimmBackbone, or SPM without lean mode (backprop_backbone=True)")
        if isinstance(x, (list, tuple)):
            x = type(x)(self.method.decoder_features(x, state))
        return x, state

    def extract_feat(self, inputs: Tensor) -> List[Tensor]:
        x, _ = self._backbone_with_prompts(inputs)
        if self.with_neck:
            x = self.neck(x)
        return x

    def loss(self, inputs: Tensor, data_samples) -> Dict[str, Tensor]:
        if not self._identity_published:  # into the Runner checkpoints of this run: see checkpoints.py
            from .checkpoints import publish_identity

            self._identity_published = publish_identity(self)
        x, state = self._backbone_with_prompts(inputs)
        if self.with_neck:
            x = self.neck(x)
        losses: Dict[str, Tensor] = {}
        losses.update(self._decode_head_forward_train(x, data_samples))
        if self.with_auxiliary_head:
            losses.update(self._auxiliary_head_forward_train(x, data_samples))
        if state.get("interim"):
            labels = torch.stack([ds.gt_sem_seg.data for ds in data_samples]).to(inputs.device).squeeze(1).long()
            losses.update(interim_losses(self.method, state, labels, self.ignore_index, prefix="prompt."))
        return losses

    # ------------------------------------------------------------- identity
    def describe(self) -> Dict[str, Any]:
        aux = self.auxiliary_head if self.with_auxiliary_head else None
        if isinstance(aux, nn.ModuleList):
            aux_names = [type(a).__name__ for a in aux]
        else:
            aux_names = [type(aux).__name__] if aux is not None else []
        return describe_model(
            self,
            method=self.method_name,
            method_config=self.method.config.to_dict(),
            decoder=type(self.decode_head).__name__,
            decoder_config={
                "auxiliary_heads": aux_names,
                "neck": type(self.neck).__name__ if self.with_neck else None,
            },
            num_classes=self.num_classes,
            class_names=self.class_names,
            ignore_index=self.ignore_index,
            architecture=backbone_architecture(self.backbone),
        )
