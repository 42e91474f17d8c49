"""A plain training loop and mIoU evaluation for segmentors on in-memory arrays.

Shared by ``tools/demo.py`` and the benchmark; research code with its own loop does not
need it.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .divergence import DivergenceError, DivergenceGuard, non_finite_tensors, trainable_buffers
from .inference import Size2, autocast_context, check_amp
from .measure import Stopwatch

__all__ = ["train_segmentor", "confusion_matrix", "mean_iou", "evaluate_segmentor", "holdout_split"]

_logger = logging.getLogger(__name__)


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
    amp: Optional[str] = None,
    channels_last: bool = False,
    compile: bool = False,
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

    ``amp="bf16"`` runs the forward pass and loss under ``torch.autocast`` on ``device``;
    ``amp="fp16"`` (CUDA only) also scales the loss with a ``torch.amp.GradScaler``, which
    skips steps whose gradients overflow on its own (only a non-finite loss counts as a bad
    step then). ``channels_last`` converts the model and every batch to channels-last
    memory format; ``compile`` runs ``model.loss`` (forward and loss) through
    ``torch.compile`` while the optimiser and the divergence checks use ``model`` itself.

    Batches go to ``device`` (default: the model's), in the model's float dtype.
    """
    device, dtype = _model_place(model, device)
    check_amp(amp, device.type)  # an unusable amp fails before any work
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = torch.compile(model.loss) if compile else model.loss
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
    watch = Stopwatch(device)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x, y = images[idx], labels[idx]
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        x, y = x.to(device, dtype if x.is_floating_point() else None), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        watch.start()
        guard.begin_step(buffers)
        with autocast_context(amp, device.type):
            loss = sum(loss_fn(x, y).values())
        opt.zero_grad(set_to_none=True)
        step_lr = max(grp["lr"] for grp in opt.param_groups)  # the head's lr (a backbone group has a multiplier)
        if guard.loss_finite(loss):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        # with a GradScaler, overflowing gradients are the scaler's business (it skips the update)
        if guard.step_ok(step, loss, step_lr, None if scaler is not None else params):
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
                with warnings.catch_warnings():  # the scaler may have skipped opt.step(): intended
                    warnings.simplefilter("ignore", UserWarning)
                    sched.step()
            else:
                opt.step()
                sched.step()
        else:
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # "scheduler stepped before the optimiser": intended here
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
        times.append(watch.stop())
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


def _model_place(model: nn.Module, device: Optional[torch.device]) -> Tuple[torch.device, Optional[torch.dtype]]:
    """``device`` (default: that of the model's first parameter, else the CPU) and the model's
    float dtype (``None`` when it has no float parameter)."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    return torch.device(device), (first.dtype if first is not None else None)


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
    mode: str = "whole",
    crop: Optional[Size2] = None,
    stride: Optional[Size2] = None,
    amp: Optional[str] = None,
    channels_last: bool = False,
) -> Tuple[float, List[Optional[float]], torch.Tensor]:
    """mIoU, per-class IoU and the predicted class maps of ``images``.

    Predictions come from :func:`promptmatch.predict` with ``mode``, ``crop``, ``stride`` and
    ``amp`` (``mode="slide"`` is mmseg's sliding-window inference; images of a size the
    backbone does not take are padded and cropped back); ``channels_last`` converts the model
    and the images to channels-last memory format. ``device``: where the images go (default:
    the model's).
    """
    device = _model_place(model, device)[0]
    check_amp(amp, device.type)
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    conf = torch.zeros(k, k, dtype=torch.long)
    preds = []
    from .predict import predict

    for i in range(0, len(images), batch):
        p = predict(model, images[i : i + batch].to(device), mode=mode, crop=crop, stride=stride, batch=batch,
                    amp=amp, channels_last=channels_last, progress=False).cpu()
        preds.append(p)
        conf += confusion_matrix(p, labels[i : i + batch].cpu(), k)  # predictions come back on the CPU
    m, per_class = mean_iou(conf)
    return m, per_class, torch.cat(preds)


def holdout_split(n: int, fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Sorted ``(train_indices, holdout_indices)`` of ``range(n)`` with ``round(fraction * n)`` held out.

    The held-out indices are the first ones of ``numpy.random.default_rng(seed).permutation(n)``,
    so a split depends only on ``(n, fraction, seed)``. Used to pick a learning rate on a part
    of the training split. Raises ``ValueError`` unless at least one index is held out and at
    least one is left for training.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(fraction, (int, float, np.floating)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number strictly between 0 and 1, got {fraction!r}")
    n = int(n)
    k = int(round(fraction * n))
    if k < 1 or k > n - 1:
        raise ValueError(f"holding out round({fraction:g} * {n}) = {k} of {n} item(s) leaves "
                         f"{'nothing held out' if k < 1 else 'nothing to train on'}: need 1 <= held out <= n - 1")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])
