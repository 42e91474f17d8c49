"""Which device mmengine's Runner puts a model on: the folder engine and the mmseg engine
choose it per run instead of mmengine's import-time answer (``"cuda"`` whenever a GPU is
visible)."""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["mmengine_device"]


@contextlib.contextmanager
def mmengine_device(device_type: str) -> Iterator[None]:
    """Make mmengine's ``get_device()`` answer ``device_type`` (``"cpu"``, ``"cuda"``) inside the block.

    mmengine decides once, when it is imported, which device its Runner puts every model on
    (``Runner.wrap_model`` moves the model to ``get_device()``: ``"cuda"`` whenever a GPU is
    visible) and which device type its ``autocast`` defaults to. A run meant for the CPU on a
    machine with GPUs builds and runs its Runner inside this block, and so stays on the CPU.
    """
    import mmengine
    from mmengine.device import utils as device_utils

    if not isinstance(getattr(device_utils, "DEVICE", None), str):
        raise RuntimeError(
            f"this mmengine ({mmengine.__version__}) does not keep its device in "
            "mmengine.device.utils.DEVICE (mmengine 0.10.x does): promptmatch cannot choose the device of a "
            "Runner; hide the GPUs for a CPU run with CUDA_VISIBLE_DEVICES=")
    previous = device_utils.DEVICE
    device_utils.DEVICE = str(device_type)
    try:
        yield
    finally:
        device_utils.DEVICE = previous
