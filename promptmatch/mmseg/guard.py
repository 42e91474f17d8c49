"""The divergence check of an mmengine training step (``train_step`` of a model or a DDP wrapper).

mmengine's ``OptimWrapper.update_params`` runs backward and the optimiser step back to back;
:func:`guarded_update` does the same with :class:`~promptmatch.divergence.DivergenceGuard`
in between, so a non-finite loss or gradient stops the run (or skips the step, with
``max_bad_steps``) before it changes a weight. Under several processes the decision is
taken together (one tiny all-reduce), so every process skips or steps alike.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..divergence import DivergenceGuard, all_processes_agree

__all__ = ["guarded_train_step", "guarded_update", "current_iter", "current_lr"]


def current_iter(default: int) -> int:
    """The Runner's current (0-based) training iteration, from mmengine's message hub."""
    try:
        from mmengine.logging import MessageHub

        it = MessageHub.get_current_instance().get_info("iter")
    except Exception:  # pragma: no cover - no runner
        it = None
    return int(it) if it is not None else default


def current_lr(optim_wrapper: Any) -> Optional[float]:
    """The learning rate of the optimiser's first parameter group (``None`` if unknown)."""
    try:
        lrs = optim_wrapper.get_lr()["lr"]
        return float(lrs[0])
    except Exception:  # pragma: no cover - exotic wrappers
        return None


def guarded_update(module: nn.Module, optim_wrapper: Any, loss: torch.Tensor) -> None:
    """``optim_wrapper.update_params(loss)`` that refuses non-finite losses and gradients.

    ``module`` is the prompted model (``PromptEncoderDecoder``) that owns the guard. With an
    AMP loss scaler the gradient check is left to the scaler (scaled fp16 gradients overflow
    by design); the loss check stays.
    """
    guard: DivergenceGuard = module.divergence_guard
    step = current_iter(default=len(guard.skipped))
    lr = current_lr(optim_wrapper)
    if not all_processes_agree(guard.loss_finite(loss), loss.device):
        optim_wrapper.zero_grad()
        guard.bad_step(step, loss, lr, "loss")  # raises unless a skip is allowed
        return
    optim_wrapper.backward(optim_wrapper.scale_loss(loss))
    params = None if getattr(optim_wrapper, "loss_scaler", None) is not None else module.trainable_parameters()
    if guard.step_ok(step, loss, lr, params):  # gradients are all-reduced by now: every process agrees
        if optim_wrapper.should_update():
            optim_wrapper.step()
            optim_wrapper.zero_grad()
    else:
        optim_wrapper.zero_grad()


def guarded_train_step(model: nn.Module, module: nn.Module, data: Any, optim_wrapper: Any) -> Dict[str, torch.Tensor]:
    """mmengine's ``train_step`` for ``model`` (the prompted model, or a DDP wrapper of ``module``)."""
    module.divergence_guard.begin_step(module.trainable_buffers())  # a bad step puts BN statistics back
    with optim_wrapper.optim_context(model):
        data = module.data_preprocessor(data, True)
        losses = model._run_forward(data, mode="loss")
    module._guarded_step = True
    try:
        parsed, log_vars = module.parse_losses(losses)
    finally:
        module._guarded_step = False
    guarded_update(module, optim_wrapper, parsed)
    return log_vars
