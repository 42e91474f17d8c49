"""Detecting a diverged training run: non-finite losses, gradients and weights.

Every training path of the library (``promptmatch.training.train_segmentor``, the
benchmark's cells, ``PromptEncoderDecoder`` under any mmengine Runner) asks one
:class:`DivergenceGuard` before each optimiser step whether the step is sound. By default
the first bad step stops the run with :class:`DivergenceError`, naming the step, the loss and
the learning rate; ``max_bad_steps=N`` skips up to N bad steps instead (no update is made,
as AMP's grad scaler does), and the run stops at the next one. :func:`save_prompts
<promptmatch.save_prompts>` refuses non-finite tensors (:class:`NonFiniteError`), so a
diverged model never replaces a good prompt checkpoint.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "DivergenceError",
    "NonFiniteError",
    "DivergenceGuard",
    "non_finite_tensors",
    "grads_finite",
    "check_max_bad_steps",
    "trainable_buffers",
    "all_processes_agree",
]

_logger = logging.getLogger(__name__)

Number = Union[float, int, torch.Tensor]


class DivergenceError(RuntimeError):
    """Training diverged: a loss, gradient or weight became NaN or infinite.

    Attributes:
        step: the 0-based index of the step (or iteration) where it happened.
        loss: the loss of that step (``nan``/``inf``, or finite when the gradients were not).
        lr: the learning rate of that step (``None`` where unknown).
        skipped: the steps skipped before, under ``max_bad_steps``.
        reason: what was not finite (``"loss"``, ``"gradients"`` or ``"weights"``).
    """

    def __init__(self, message: str, *, step: int, loss: float, lr: Optional[float], skipped: List[int],
                 reason: str) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.lr = lr
        self.skipped = list(skipped)
        self.reason = reason

    def __reduce__(self):  # picklable across processes (DataLoader workers, multiprocessing)
        return (_rebuild_divergence_error, (str(self), self.step, self.loss, self.lr, self.skipped, self.reason))


def _rebuild_divergence_error(message, step, loss, lr, skipped, reason):
    return DivergenceError(message, step=step, loss=loss, lr=lr, skipped=skipped, reason=reason)


class NonFiniteError(ValueError):
    """Tensors meant for a checkpoint hold NaN or infinite values."""


def check_max_bad_steps(value: int, where: str = "max_bad_steps") -> int:
    """``value`` if it is an integer >= 0, else a ``ValueError`` that says so."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} must be an integer >= 0 (0: stop at the first non-finite step), got {value!r}")
    return value


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    bad = []
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without one are ignored)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    # the largest magnitude: inf or nan only where an element is (a 2-norm could overflow)
    if hasattr(torch, "_foreach_norm"):
        peaks = torch._foreach_norm(grads, float("inf"))
    else:  # pragma: no cover - old torch
        peaks = [g.abs().max() for g in grads]
    return bool(torch.isfinite(torch.stack([m.float().reshape(()) for m in peaks])).all())


def trainable_buffers(model: torch.nn.Module) -> List[torch.Tensor]:
    """The buffers of ``model`` that training changes and prompt checkpoints hold (BatchNorm
    statistics of heads and matchers; of the backbone too when it is not frozen)."""
    names = set(model.trainable_state_dict()) if hasattr(model, "trainable_state_dict") else None
    return [b for n, b in model.named_buffers() if names is None or n in names]


def _as_float(v: Optional[Number]) -> float:
    if v is None:
        return float("nan")
    return float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v)


class DivergenceGuard:
    """Decides, step by step, whether a training step may update the weights.

    Args:
        max_bad_steps: how many non-finite steps to skip (no update) before stopping; ``0``
            stops at the first one.
        where: a name for messages (``"training"``, ``"benchmark cell ..."``).
        hint: what the message suggests to change (default: lower the learning rate or
            allow skipping).
        log: where a skipped step is reported (default: a warning of this module's logger).
    """

    def __init__(self, max_bad_steps: int = 0, where: str = "training", hint: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.max_bad_steps = check_max_bad_steps(max_bad_steps)
        self.where = where
        self.hint = hint
        self.log = log or _logger.warning
        self.skipped: List[int] = []
        self.last_step_ok = True
        self._buffers: List[torch.Tensor] = []
        self._copies: List[torch.Tensor] = []

    def begin_step(self, buffers: Sequence[torch.Tensor] = ()) -> None:
        """Remember ``buffers`` (e.g. BatchNorm statistics, which a training forward pass
        updates) so that a bad step can put them back; call before the forward pass."""
        self._buffers = list(buffers)
        if len(self._copies) != len(self._buffers) or any(
                c.shape != b.shape or c.device != b.device or c.dtype != b.dtype
                for c, b in zip(self._copies, self._buffers)):
            self._copies = [b.detach().clone() for b in self._buffers]
            return
        with torch.no_grad():
            for c, b in zip(self._copies, self._buffers):
                c.copy_(b)

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for c, b in zip(self._copies, self._buffers):
                b.copy_(c)

    @staticmethod
    def loss_finite(loss: Number) -> bool:
        return math.isfinite(_as_float(loss))

    def step_ok(self, step: int, loss: Number, lr: Optional[float] = None,
                params: Optional[Iterable[torch.nn.Parameter]] = None) -> bool:
        """``True`` if the loss (and the gradients of ``params``, when given) are finite.

        Otherwise counts a bad step and returns ``False`` (the caller skips the update), or
        raises :class:`DivergenceError` once more than ``max_bad_steps`` were bad.
        """
        if not self.loss_finite(loss):
            self.bad_step(step, loss, lr, "loss")
            return False
        if params is not None and not grads_finite(params):
            self.bad_step(step, loss, lr, "gradients")
            return False
        self.last_step_ok = True
        return True

    def bad_step(self, step: int, loss: Number, lr: Optional[float], reason: str) -> None:
        """Record a non-finite step; raise :class:`DivergenceError` when the budget is spent.

        Either way the buffers given to :meth:`begin_step` are put back as they were before
        the step.
        """
        self.last_step_ok = False
        self._restore_buffers()
        loss_f = _as_float(loss)
        lr_txt = f"{lr:g}" if lr is not None else "unknown"
        what = {"loss": f"the loss is {loss_f}", "gradients": f"the gradients are not finite (loss {loss_f:g})",
                "weights": "trainable weights are not finite"}[reason]
        if len(self.skipped) < self.max_bad_steps:
            self.skipped.append(step)
            self.log(f"{self.where}: step {step} skipped ({what}, lr {lr_txt}); {len(self.skipped)} of "
                     f"{self.max_bad_steps} bad steps allowed so far")
            return
        skipped = f"; {len(self.skipped)} bad step(s) skipped before, at {self.skipped[:10]}" if self.skipped else ""
        hint = self.hint or ("lower the learning rate, or allow a few bad steps to be skipped "
                             f"(max_bad_steps > {self.max_bad_steps})")
        raise DivergenceError(
            f"{self.where} diverged at step {step}: {what} (lr {lr_txt}){skipped}. Nothing was updated "
            f"with this step and no checkpoint was written from it: {hint}",
            step=step, loss=loss_f, lr=lr, skipped=self.skipped, reason=reason)

    def summary(self) -> str:
        """One line on the bad steps skipped so far (empty if none)."""
        if not self.skipped:
            return ""
        return (f"{self.where}: {len(self.skipped)} non-finite step(s) skipped (of {self.max_bad_steps} allowed), "
                f"at steps {self.skipped[:10]}{' ...' if len(self.skipped) > 10 else ''}")


def all_processes_agree(flag: bool, device: torch.device) -> bool:
    """``flag`` if this process runs alone; else whether every process of the default
    ``torch.distributed`` group has it true (so that all of them skip, or none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)
