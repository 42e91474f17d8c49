"""promptmatch's segmentor as an mmengine model: loss, guarded training step, evaluation.

:class:`SegmentorModel` wraps a :class:`~promptmatch.PromptSegmentor`: its training loss is the
segmentor's own ``loss`` (decode loss plus a method's interim losses, e.g. SPM's, exactly as
:func:`promptmatch.training.train_segmentor` sums them); evaluation runs
:func:`promptmatch.predict` (whole image or sliding windows, padding to sizes the backbone
takes) and resizes the logits to the label's size. Every training step asks a
:class:`~promptmatch.divergence.DivergenceGuard` before it updates (all processes agree).
Its ``state_dict`` holds what a prompt checkpoint holds (not the frozen backbone), so the
Runner's checkpoints stay small; loading one fills the frozen weights from the model itself.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel, MMDistributedDataParallel
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS
from torch import nn

from ..divergence import DivergenceGuard, all_processes_agree
from ..inference import Size2, check_amp
from ..predict import predict

__all__ = ["SegmentorModel", "FolderDistributedDataParallel", "AutocastWrapper", "DDP_WRAPPER_NAME"]

_logger = logging.getLogger(__name__)

#: the name the distributed wrapper is registered under in mmengine's MODEL_WRAPPERS
DDP_WRAPPER_NAME = "PromptMatchFolderDDP"


class SegmentorModel(BaseModel):
    """An mmengine ``BaseModel`` around ``segmentor`` (a :class:`~promptmatch.PromptSegmentor`).

    Args:
        segmentor: the prompted segmentor; reachable as ``.segmentor``.
        eval_mode, eval_crop, eval_stride: ``"whole"`` or ``"slide"`` inference, as
            :func:`promptmatch.predict` (crop/stride default to predict's).
        amp: ``"bf16"``/``"fp16"`` autocast during evaluation (training autocasts through the
            optimiser wrapper).
        max_bad_steps: non-finite steps skipped (no update) before training stops with
            :class:`~promptmatch.DivergenceError`.

    ``forward(inputs, labels, metas, mode)``: ``mode="loss"`` returns the named losses of a
    stacked batch; ``"predict"`` a list of ``{"pred", "label"}`` class maps at each label's
    size; ``"tensor"`` the logits of a stacked batch.
    """

    def __init__(self, segmentor: nn.Module, eval_mode: str = "whole", eval_crop: Optional[Size2] = None,
                 eval_stride: Optional[Size2] = None, amp: Optional[str] = None, max_bad_steps: int = 0) -> None:
        super().__init__()
        if eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {eval_mode!r}")
        self.segmentor = segmentor
        self.eval_mode, self.eval_crop, self.eval_stride, self.amp = eval_mode, eval_crop, eval_stride, amp
        self.divergence_guard = DivergenceGuard(max_bad_steps, where="training")
        self._register_load_state_dict_pre_hook(self._fill_frozen)

    # ----------------------------------------------------------------- forward
    def forward(self, inputs: Union[torch.Tensor, List[torch.Tensor]], labels: Any = None, metas: Any = None,
                mode: str = "tensor") -> Any:
        if mode == "loss":
            return self.segmentor.loss(inputs, labels)
        if mode == "predict":
            return self.predict_maps(inputs, labels)
        if mode == "tensor":
            return self.segmentor(inputs)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    @torch.no_grad()
    def predict_maps(self, inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
                     labels: Optional[Sequence[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
        """Class maps of normalised images (any sizes) through :func:`promptmatch.predict`, resized
        (logits, bilinearly) to each label's size; ``label`` is returned beside each map."""
        images = list(inputs) if not isinstance(inputs, torch.Tensor) or inputs.ndim == 4 else [inputs]
        _, logits = predict(self.segmentor, images, mode=self.eval_mode,
                            crop=self.eval_crop if self.eval_mode == "slide" else None,
                            stride=self.eval_stride if self.eval_mode == "slide" else None,
                            batch=max(1, len(images)), return_logits=True, amp=self.amp, progress=False)
        out = []
        for i, lg in enumerate(logits):
            label = labels[i] if labels is not None else None
            if label is not None and tuple(lg.shape[-2:]) != tuple(label.shape[-2:]):
                lg = F.interpolate(lg[None].float(), size=tuple(label.shape[-2:]), mode="bilinear",
                                   align_corners=False)[0]
            out.append({"pred": lg.argmax(0), "label": label if label is not None else lg.argmax(0)})
        return out

    # --------------------------------------------------------------- training
    def train_step(self, data: Any, optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """mmengine's train step with the divergence check (see :func:`guarded_train_step`)."""
        return guarded_train_step(self, self, data, optim_wrapper)

    # ------------------------------------------------------------------ state
    def _frozen_keys(self, prefix: str = "") -> List[str]:
        keep = set(self.segmentor.trainable_state_dict())
        return [f"{prefix}segmentor.{k}" for k in self.segmentor.state_dict() if k not in keep]

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:  # type: ignore[override]
        """The state without the frozen backbone weights (what a prompt checkpoint holds)."""
        state = super().state_dict(*args, **kwargs)
        for key in self._frozen_keys(kwargs.get("prefix", "")):
            state.pop(key, None)
        return state

    def _fill_frozen(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Before loading: the frozen weights a checkpoint leaves out come from this model."""
        own = super().state_dict()
        for key in self._frozen_keys():
            state_dict.setdefault(prefix + key, own[key])


def _current_iter(default: int) -> int:
    try:
        from mmengine.logging import MessageHub

        it = MessageHub.get_current_instance().get_info("iter")
    except Exception:  # noqa: BLE001 - no runner around
        it = None
    return int(it) if it is not None else default


def guarded_train_step(model: nn.Module, module: SegmentorModel, data: Any,
                       optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
    """One training iteration of ``module`` (through ``model``, itself or its DDP wrapper).

    As mmengine's ``BaseModel.train_step`` (forward under the wrapper's context, losses summed
    by ``parse_losses``, backward, step), but a non-finite loss (on any process) or gradient
    skips the update, putting BatchNorm statistics back, or stops training under the model's
    ``max_bad_steps``. With a loss scaler (fp16) the scaler judges the gradients.
    """
    guard = module.divergence_guard
    guard.begin_step(module.segmentor.trainable_buffers())
    with optim_wrapper.optim_context(model):
        data = module.data_preprocessor(data, True)
        losses = model._run_forward(data, mode="loss")  # type: ignore[operator]
    loss, log_vars = module.parse_losses(losses)
    step = _current_iter(default=len(guard.skipped))
    try:
        lr: Optional[float] = max(float(v) for v in optim_wrapper.get_lr()["lr"])  # the head's (training.py's rule)
    except Exception:  # noqa: BLE001 - exotic wrappers
        lr = None
    if not all_processes_agree(guard.loss_finite(loss), loss.device):
        optim_wrapper.zero_grad()
        guard.bad_step(step, loss, lr, "loss")  # raises unless a skip is allowed
        return log_vars
    optim_wrapper.backward(optim_wrapper.scale_loss(loss))
    scaler = getattr(optim_wrapper, "loss_scaler", None)
    params = None if scaler is not None else module.segmentor.trainable_parameters()
    if guard.step_ok(step, loss, lr, params):  # gradients are all-reduced by now: every process agrees
        if optim_wrapper.should_update():
            optim_wrapper.step()
            optim_wrapper.zero_grad()
    else:
        optim_wrapper.zero_grad()
    return log_vars


class FolderDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper with the guarded train step; without CUDA it runs on CPUs (gloo,
    no device ids)."""

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        if not torch.cuda.is_available():
            kwargs["device_ids"] = None
        kwargs.setdefault("broadcast_buffers", False)
        super().__init__(module=module, **kwargs)

    def train_step(self, data: Any, optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        return guarded_train_step(self, self.module, data, optim_wrapper)


MODEL_WRAPPERS.register_module(name=DDP_WRAPPER_NAME, module=FolderDistributedDataParallel, force=True)


class AutocastWrapper(OptimWrapper):
    """An ``OptimWrapper`` whose forward pass runs under ``torch.autocast`` without loss scaling:
    bf16 on CPUs, where mmengine's ``AmpOptimWrapper`` (CUDA only) does not start."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, device_type: str = "cpu", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cast_dtype, self.device_type = dtype, device_type

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast(device_type=self.device_type, dtype=self.cast_dtype):
            yield


def build_optim_wrapper(segmentor: nn.Module, lr: float, weight_decay: float, amp: Optional[str],
                        device_type: str, betas=(0.9, 0.999)) -> OptimWrapper:
    """AdamW over ``segmentor.param_groups`` (a method that trains the backbone gets its lr
    multiplier there) in the wrapper ``amp`` calls for: mmengine's ``AmpOptimWrapper`` on CUDA
    (bf16 or fp16, dynamic loss scaling), :class:`AutocastWrapper` for bf16 on CPUs, plain
    ``OptimWrapper`` without amp."""
    dtype = check_amp(amp, device_type)
    optimizer = torch.optim.AdamW(segmentor.param_groups(lr=lr, weight_decay=weight_decay), lr=lr, betas=betas,
                                  weight_decay=weight_decay)
    if dtype is None:
        return OptimWrapper(optimizer=optimizer)
    if device_type == "cuda":
        from mmengine.optim import AmpOptimWrapper

        return AmpOptimWrapper(optimizer=optimizer, dtype=dtype, loss_scale="dynamic")
    return AutocastWrapper(dtype=dtype, device_type=device_type, optimizer=optimizer)
