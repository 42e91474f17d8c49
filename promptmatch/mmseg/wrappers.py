"""Distributed data parallel for CPU-only machines (gloo)."""
from __future__ import annotations

from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm

from ..registry import MODEL_WRAPPERS

__all__ = ["CPUDistributedDataParallel"]


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel without devices: SyncBN (GPU only) becomes BatchNorm first.

    Gradients are still averaged over processes by DDP; BatchNorm statistics stay local.
    """

    def __init__(self, module, **kwargs):
        kwargs["device_ids"] = None
        super().__init__(module=revert_sync_batchnorm(module), **kwargs)
