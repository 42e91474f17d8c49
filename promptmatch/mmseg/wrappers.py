"""Distributed data parallel wrappers whose train step checks for divergence."""
from __future__ import annotations

from typing import Any, Dict

from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm

from ..registry import MODEL_WRAPPERS

__all__ = ["PromptDistributedDataParallel", "CPUDistributedDataParallel"]


@MODEL_WRAPPERS.register_module()
class PromptDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's ``MMDistributedDataParallel`` with the prompted model's divergence check.

    A non-finite loss (on any process) or gradient stops training, or skips the iteration
    on every process alike under the model's ``max_bad_steps``; see
    :mod:`promptmatch.mmseg.guard`. ``tools/train.py`` uses it for distributed runs; with
    mmseg's own tools set ``model_wrapper_cfg=dict(type='promptmatch.PromptDistributedDataParallel')``.
    """

    def train_step(self, data: Any, optim_wrapper: Any) -> Dict[str, Any]:
        if not hasattr(self.module, "divergence_guard"):  # not a prompted model
            return super().train_step(data, optim_wrapper)
        from .guard import guarded_train_step

        return guarded_train_step(self, self.module, data, optim_wrapper)


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(PromptDistributedDataParallel):
    """The same without devices (gloo): SyncBN (GPU only) becomes BatchNorm first.

    Gradients are still averaged over processes by DDP; BatchNorm statistics stay local.
    """

    def __init__(self, module, **kwargs):
        kwargs["device_ids"] = None
        super().__init__(module=revert_sync_batchnorm(module), **kwargs)
