"""mmengine hooks of the folder engine (a progress bar with ETA, step timing, the last
validation's metrics) and trusted loading of the Runner's own checkpoints."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from ..measure import Stopwatch

__all__ = ["ProgressHook", "StepTimerHook", "MetricsHook"]


def _scalar(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class ProgressHook(Hook):
    """A tqdm bar over the training iterations (ETA and loss) on the main process only; the
    other processes log through mmengine's LoggerHook. ``enabled=False`` shows no bar."""

    priority = "LOW"

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def before_train(self, runner: Any) -> None:
        if not (self.enabled and is_main_process()):
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=runner.max_iters, initial=runner.iter, desc="train", unit="it", dynamic_ncols=True)

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self._bar is None:
            return
        if isinstance(outputs, Mapping) and "loss" in outputs:
            self._bar.set_postfix(loss=f"{_scalar(outputs['loss']):.4f}", refresh=False)
        self._bar.update(1)

    def after_train(self, runner: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StepTimerHook(Hook):
    """Wall time (device synced), loss and index of every training iteration this run made,
    and on a GPU the allocator's peak over them (:attr:`peak`, bytes): read after every
    iteration, before mmengine's logger (a lower priority) resets CUDA's peak counter."""

    priority = "VERY_HIGH"

    def __init__(self, device: Any = None) -> None:
        self.times: List[float] = []
        self.losses: List[float] = []
        self.iters: List[int] = []
        self.peak: Optional[int] = None
        self._watch = Stopwatch(device)

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self._watch.start()

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        self.times.append(self._watch.stop())
        self.iters.append(int(batch_idx))
        device = self._watch.device
        if getattr(device, "type", None) == "cuda":
            peak = int(torch.cuda.max_memory_allocated(device))
            self.peak = peak if self.peak is None else max(self.peak, peak)
        if isinstance(outputs, Mapping) and "loss" in outputs:
            self.losses.append(_scalar(outputs["loss"]))


class MetricsHook(Hook):
    """Keeps the metrics of the last validation (``.metrics``; ``None`` before one)."""

    def __init__(self) -> None:
        self.metrics: Optional[Dict[str, float]] = None

    def after_val_epoch(self, runner: Any, metrics: Optional[Dict[str, float]] = None) -> None:
        self.metrics = dict(metrics or {})
