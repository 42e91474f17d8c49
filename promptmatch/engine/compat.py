"""Where promptmatch's runs differ from mmengine's defaults, for the folder engine and the
mmseg integration alike: the device a Runner puts the model on (chosen per run instead of
mmengine's import-time answer, ``"cuda"`` whenever a GPU is visible), loading the Runner
checkpoints a run wrote itself under torch >= 2.6, and ending a torchrun run's process group
together."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["mmengine_device", "trust_checkpoints_under", "close_process_group"]


def close_process_group() -> None:
    """End a torchrun run's process group in every process together (a barrier, then
    ``destroy_process_group``); nothing outside a distributed run.

    mmengine leaves the group open when training ends: a process that exits while another
    still writes its checkpoints tears the gloo transport down under it, and the C++ runtime
    aborts one of them (``terminate called without an active exception``), failing the
    launch after every checkpoint was written. Call it where every process arrives, after
    training ended normally, never on an error path one process took alone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


@contextlib.contextmanager
def trust_checkpoints_under(directory: os.PathLike) -> Iterator[None]:
    """Let ``torch.load`` unpickle mmengine Runner checkpoints (they hold a message hub and other
    Python objects, which torch >= 2.6 refuses by default), but only files under ``directory``:
    those a run wrote into its own work dir. Every other file keeps the ``weights_only`` check."""
    root = Path(directory).resolve()
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)) and "weights_only" not in kwargs:
            try:
                inside = Path(f).resolve().is_relative_to(root)
            except (OSError, ValueError):
                inside = False
            if inside:
                kwargs["weights_only"] = False
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
