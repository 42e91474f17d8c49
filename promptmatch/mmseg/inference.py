"""Inference with a prompted mmseg model, as mmseg users expect it.

:func:`init_model` is the prompted counterpart of ``mmseg.apis.init_model``: the model it
returns works with mmseg's ``inference_model`` and ``show_result_pyplot``::

    from mmseg.apis import inference_model, show_result_pyplot
    from promptmatch.mmseg import init_model

    model = init_model("my_config.py", "work_dirs/ade20k_spm/prompts.safetensors", device="cuda")
    result = inference_model(model, "demo.jpg")
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Union

from torch import nn

from ..core import PromptCheckpointable
from .checkpoints import load_prompts_or_runner_checkpoint

__all__ = ["init_model", "build_prompted_model", "dataset_metainfo", "test_dataset_cfg"]


def test_dataset_cfg(cfg: Any) -> Optional[Dict[str, Any]]:
    """The config's test (else val) dataset entry, unwrapped from dataset wrappers."""
    loader = cfg.get("test_dataloader") or cfg.get("val_dataloader")
    ds = loader.get("dataset") if loader else None
    while ds is not None and ("dataset" in ds or "datasets" in ds):
        ds = ds["dataset"] if "dataset" in ds else (ds["datasets"][0] if ds["datasets"] else None)
    return ds


def dataset_metainfo(cfg: Any) -> Dict[str, Any]:
    """Classes and palette of the config's test dataset (its class's METAINFO updated by the
    config's ``metainfo``), read without building the dataset."""
    from mmseg.registry import DATASETS

    ds = test_dataset_cfg(cfg)
    if ds is None:
        return {}
    info: Dict[str, Any] = {}
    try:
        cls = DATASETS.get(ds.get("type"))
    except Exception:  # noqa: BLE001 - unknown or unimportable dataset type: no metainfo
        cls = None
    if cls is not None:
        info.update(getattr(cls, "METAINFO", {}) or {})
    info.update(dict(ds.get("metainfo") or {}))
    return info


def build_prompted_model(cfg: Any) -> nn.Module:
    """The config's promptmatch model with its frozen backbone's pretrained weights loaded
    (``init_weights``) and the dataset's class names set; prompts and heads not loaded yet.

    Raises ``TypeError`` if the config's model is not a promptmatch model and
    ``FileNotFoundError`` if the backbone's pretrained weights are missing.
    """
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    model = MODELS.build(cfg.model)
    if not isinstance(model, PromptCheckpointable):
        raise TypeError(f"the config's model ({type(model).__name__}) is not a promptmatch model; add "
                        "model = dict(type='promptmatch.PromptEncoderDecoder') to the config")
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs one line per parameter
    try:
        model.init_weights()  # the frozen backbone's pretrained weights; heads are replaced by the prompts
    finally:
        logger.setLevel(level)
    if getattr(model, "class_names", None) is None:
        classes = dataset_metainfo(cfg).get("classes")
        if classes is not None and len(classes) == model.num_classes:
            model.class_names = list(classes)
    return model


def init_model(config: Union[str, os.PathLike, Any], checkpoint: Optional[Union[str, os.PathLike]] = None,
               device: str = "cpu", cfg_options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A prompted segmentor ready for mmseg's ``inference_model`` / ``show_result_pyplot``.

    Args:
        config: config file path or ``mmengine.Config`` (with the promptmatch model line).
        checkpoint: a prompt checkpoint (``.safetensors``) or an mmengine Runner checkpoint
            (``.pth``) of the prompted model; ``None`` keeps the freshly built heads.
        device: where to put the model.
        cfg_options: overrides merged into the config.

    Refuses (:class:`~promptmatch.PromptMismatchError`) prompts made for another backbone,
    class set, method or head. The model is in eval mode, with ``cfg`` and ``dataset_meta``
    (``classes``, ``palette``) set as mmseg's own ``init_model`` does.
    """
    from mmengine.config import Config
    from mmengine.model.utils import revert_sync_batchnorm

    cfg = Config.fromfile(str(config)) if isinstance(config, (str, os.PathLike)) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = build_prompted_model(cfg)
    if checkpoint is not None:
        load_prompts_or_runner_checkpoint(model, checkpoint)
    model.cfg = cfg
    info = dataset_metainfo(cfg)
    classes = model.class_names or info.get("classes") or [str(i) for i in range(model.num_classes)]
    model.dataset_meta = {"classes": list(classes), "palette": info.get("palette")}
    model = revert_sync_batchnorm(model)  # SyncBN needs a process group; inference does not
    return model.to(device).eval()
