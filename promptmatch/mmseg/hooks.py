"""Writes the per-dataset prompt checkpoint during mmengine training."""
from __future__ import annotations

import logging
import os.path as osp
from typing import Any, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..checkpoint import save_prompts
from ..core import PromptCheckpointable
from ..divergence import NonFiniteError
from ..registry import HOOKS

__all__ = ["PromptCheckpointHook", "unwrap_model"]


def unwrap_model(model: Any) -> Any:
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class PromptCheckpointHook(Hook):
    """Save the prompt checkpoint (trainable weights + identity, safetensors) on rank 0.

    Writes ``<work_dir>/prompts/iter_<n>.safetensors`` every ``interval`` iterations
    (default: the CheckpointHook's interval) and ``<work_dir>/prompts.safetensors`` at the
    end of training (and at every interval, so it always holds the latest prompts).
    The dataset's class names are stored in the model before training starts.
    Prompts that are not finite (or taken right after an iteration skipped as non-finite)
    are never written: the previous files stay as they were and the log says so.
    """

    priority = "VERY_LOW"

    def __init__(self, interval: int = -1, out_dir: Optional[str] = None) -> None:
        self.interval = interval
        self.out_dir = out_dir

    def before_train(self, runner) -> None:
        model = unwrap_model(runner.model)
        if self.interval <= 0:
            ck = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
            self.interval = ck[0].interval if ck and ck[0].interval > 0 else 0
        if getattr(model, "class_names", None) is None:
            try:
                classes = runner.train_dataloader.dataset.metainfo.get("classes")
            except Exception:  # pragma: no cover - datasets without metainfo
                classes = None
            if classes is not None and len(classes) == model.num_classes:
                model.class_names = list(classes)
        from .checkpoints import publish_identity
        from .segmentor import PromptEncoderDecoder

        if isinstance(model, PromptEncoderDecoder):  # into this Runner's checkpoints; refuse a foreign resume
            model._identity_published = publish_identity(model, runner.message_hub, check=True)
        self.out_dir = self.out_dir or runner.work_dir

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval > 0 and self.every_n_train_iters(runner, self.interval):
            it = runner.iter + 1  # runner.iter counts the iterations before this one
            self._save(runner, osp.join(self.out_dir, "prompts", f"iter_{it}.safetensors"), it)

    def after_train(self, runner) -> None:
        self._save(runner, None, runner.iter)

    def _save(self, runner, path: Optional[str], iteration: int) -> None:
        model = unwrap_model(runner.model)
        if not is_main_process() or not isinstance(model, PromptCheckpointable):
            return  # only rank 0 writes; plain (non-prompted) models have no prompt checkpoint
        extra = {"iter": iteration, "work_dir": str(runner.work_dir)}
        cfg_file = getattr(runner.cfg, "filename", None)
        if cfg_file:
            extra["config"] = str(cfg_file)
        latest_path = osp.join(self.out_dir, "prompts.safetensors")
        guard = getattr(model, "divergence_guard", None)
        try:
            if guard is not None and not guard.last_step_ok:
                raise NonFiniteError(f"iteration {iteration} was skipped as non-finite")
            if path is not None:
                save_prompts(model, path, extra=extra)
            latest = save_prompts(model, latest_path, extra=extra)
        except NonFiniteError as e:
            kept = f"the last finite prompts in {latest_path} stay in place" if osp.exists(latest_path) else \
                "no prompt checkpoint has been written yet"
            print_log(f"promptmatch: prompt checkpoint NOT written at iteration {iteration} ({e}); {kept}",
                      logger="current", level=logging.WARNING)
            return
        print_log(f"promptmatch: prompt checkpoint written to {path or latest}", logger="current", level=logging.INFO)
