"""A plain training loop and mIoU evaluation for segmentors on in-memory arrays.

Shared by ``tools/demo.py`` and the benchmark; research code with its own loop does not
need it.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .divergence import DivergenceError, DivergenceGuard, non_finite_tensors, trainable_buffers

__all__ = ["train_segmentor", "confusion_matrix", "mean_iou", "evaluate_segmentor"]

_logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_segmentor(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.01,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
    max_bad_steps: int = 0,
) -> Dict[str, List[float]]:
    """Train ``model`` for ``steps`` AdamW steps on random, randomly flipped mini-batches.

    The learning rate decays polynomially (power 0.9) to zero; parameter groups come from
    ``model.param_groups`` (so methods that train the backbone get their lr multiplier).
    Returns the wall time of every step (forward, backward, update), its loss, and the
    steps skipped as non-finite (``"skipped"``).

    A step whose loss or gradients are NaN or infinite stops training with
    :class:`~promptmatch.divergence.DivergenceError` (naming the step, loss and lr) before
    it changes any weight; ``max_bad_steps=N`` skips up to N such steps instead (no update,
    the schedule goes on) and stops at the next one. A run whose last step was skipped, or
    whose trainable weights end non-finite, raises too: it never passes for a result.
    """
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.param_groups(lr=lr, weight_decay=weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / steps) ** 0.9)
    guard = DivergenceGuard(max_bad_steps, where="training")
    step_lr = lr
    params = [p for grp in opt.param_groups for p in grp["params"]]
    buffers = trainable_buffers(model)
    model.train()
    times: List[float] = []
    losses: List[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x, y = images[idx], labels[idx]
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        x, y = x.to(device), y.to(device)
        _sync(device)
        t0 = time.perf_counter()
        guard.begin_step(buffers)
        loss = sum(model.loss(x, y).values())
        opt.zero_grad(set_to_none=True)
        step_lr = max(grp["lr"] for grp in opt.param_groups)  # the head's lr (a backbone group has a multiplier)
        if guard.loss_finite(loss):
            loss.backward()
        if guard.step_ok(step, loss, step_lr, params):
            opt.step()
            sched.step()
        else:
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # "scheduler stepped before the optimiser": intended here
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    if not guard.last_step_ok:  # the skipped steps did not end: the run never recovered
        raise DivergenceError(
            f"training diverged: its last step ({steps - 1}, lr {step_lr:g}) was non-finite too, after "
            f"{len(guard.skipped)} skipped step(s) at {guard.skipped[:10]}; lower the learning rate",
            step=steps - 1, loss=losses[-1], lr=step_lr, skipped=guard.skipped[:-1], reason="loss")
    own = (model.trainable_state_dict() if hasattr(model, "trainable_state_dict")
           else {n: p for n, p in model.named_parameters() if p.requires_grad})
    bad = non_finite_tensors(own)
    if bad:  # finite steps can still overflow a weight (an absurd lr): never pass that for a result
        raise DivergenceError(
            f"training diverged: after step {steps - 1} (lr {step_lr:g}) the trainable weights "
            f"{bad[:6]} are not finite; lower the learning rate",
            step=steps - 1, loss=losses[-1], lr=step_lr, skipped=guard.skipped, reason="weights")
    if guard.skipped:
        _logger.warning(guard.summary())
    return {"times": times, "losses": losses, "skipped": list(guard.skipped)}


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, k: int, ignore: int = 255) -> torch.Tensor:
    """K x K counts of (label, prediction) pairs over pixels whose label is not ``ignore``."""
    keep = label != ignore
    return torch.bincount(label[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def mean_iou(conf: torch.Tensor) -> Tuple[float, List[Optional[float]]]:
    """mIoU over classes that occur (in labels or predictions), and each class's IoU (None if absent)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    per_class = [float(i / u) if u > 0 else None for i, u in zip(inter.tolist(), union.tolist())]
    present = [v for v in per_class if v is not None]
    return (float(np.mean(present)) if present else float("nan")), per_class


@torch.no_grad()
def evaluate_segmentor(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    batch: int = 16,
    device: Optional[torch.device] = None,
) -> Tuple[float, List[Optional[float]], torch.Tensor]:
    """mIoU, per-class IoU and the predicted class maps of ``images``."""
    device = device or torch.device("cpu")
    model.eval()
    conf = torch.zeros(k, k, dtype=torch.long)
    preds = []
    for i in range(0, len(images), batch):
        p = model(images[i : i + batch].to(device)).argmax(1).cpu()
        preds.append(p)
        conf += confusion_matrix(p, labels[i : i + batch], k)
    m, per_class = mean_iou(conf)
    return m, per_class, torch.cat(preds)
