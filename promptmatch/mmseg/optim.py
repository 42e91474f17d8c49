"""``promptmatch.AutocastOptimWrapper``: mixed-precision training on any device, CPU included.

mmengine's ``AmpOptimWrapper`` refuses to start without a GPU and always scales the loss.
This wrapper only runs the forward pass under ``torch.autocast`` on the device of the
model's parameters, with no loss scaling (bfloat16 has float32's exponent range)::

    optim_wrapper = dict(type='promptmatch.AutocastOptimWrapper', dtype='bfloat16',
                         optimizer=dict(type='AdamW', lr=1e-3))

Backward, optimiser step, gradient clipping and accumulation are plain ``OptimWrapper``'s,
so it works with :func:`promptmatch.mmseg.guard.guarded_update` (gradients are checked
unscaled, as without AMP).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import OPTIM_WRAPPERS

__all__ = ["AutocastOptimWrapper"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """The torch dtype named by ``dtype`` ('bfloat16' or 'float16'); float16 needs CUDA."""
    if isinstance(dtype, torch.dtype):
        name = next((k for k, v in _DTYPES.items() if v == dtype), None)
    else:
        name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"AutocastOptimWrapper: dtype must be 'bfloat16' or 'float16', got {dtype!r}")
    if name == "float16" and not torch.cuda.is_available():
        raise ValueError(
            "AutocastOptimWrapper: dtype='float16' needs a CUDA GPU, and none is available; "
            "use dtype='bfloat16' (works on CPU and GPU)"
        )
    return _DTYPES[name]


def _device_type(model: nn.Module) -> str:
    """The device type ('cpu', 'cuda', ...) of the model's first parameter (or buffer); 'cpu' if it has none."""
    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            return t.device.type
    return "cpu"


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` whose ``optim_context`` runs the forward pass under ``torch.autocast``.

    Args:
        dtype: the autocast dtype, ``'bfloat16'`` (default; any device) or ``'float16'``
            (only with CUDA, and only for a model on a CUDA device). A ``torch.dtype`` works too.
            There is no loss scaling: float16 gradients may underflow, for which mmengine's
            ``AmpOptimWrapper`` (with its loss scaler) is the better choice on a GPU.
        **kwargs: the arguments of ``OptimWrapper`` (``optimizer``, ``accumulative_counts``,
            ``clip_grad``).
    """

    def __init__(self, dtype: Union[str, torch.dtype] = "bfloat16", **kwargs: Any) -> None:
        self.cast_dtype = _resolve_dtype(dtype)
        super().__init__(**kwargs)
        self.loss_scaler = None  # no scaling: gradients are real, the divergence guard checks them
        if self.cast_dtype == torch.float16:
            print_log(
                "promptmatch.AutocastOptimWrapper: float16 autocast without loss scaling; small gradients "
                "may underflow to zero (bfloat16 does not need scaling; AmpOptimWrapper scales float16)",
                logger="current", level=logging.WARNING,
            )

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """OptimWrapper's context (no gradient sync while accumulating) plus ``torch.autocast``
        on the device type of ``model``'s parameters with :attr:`cast_dtype`."""
        device_type = _device_type(model)
        if self.cast_dtype == torch.float16 and device_type != "cuda":
            raise RuntimeError(
                f"AutocastOptimWrapper: dtype='float16' autocasts on CUDA only, but the model is on "
                f"{device_type!r}; use dtype='bfloat16'"
            )
        with super().optim_context(model), torch.autocast(device_type=device_type, dtype=self.cast_dtype):
            yield

    def __repr__(self) -> str:
        """OptimWrapper's description with the autocast dtype."""
        head, _, rest = super().__repr__().partition("\n")
        return f"{head}\ndtype: {self.cast_dtype}\n{rest}"
