"""What the tools need around an mmengine Runner: CPU distributed set-up, the device a Runner
puts its model on, trusted resume, data-root checks, and loading the frozen backbone before
prompts."""
from __future__ import annotations

import logging
import os.path as osp
from typing import Any, Iterator, Optional

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

from promptmatch.engine.compat import mmengine_device, trust_checkpoints_under  # noqa: F401  (re-exported)

__all__ = [
    "load_config",
    "prepare_distributed",
    "mmengine_device",
    "trust_checkpoints_under",
    "check_data_roots",
    "DatasetMissingError",
    "add_prompt_hook",
]


def load_config(
    path: str,
    cfg_options: Optional[dict] = None,
    work_dir: Optional[str] = None,
    launcher: str = "none",
) -> Config:
    """Read a config the way mmseg's tools do: ``--cfg-options`` merged, launcher set, and
    ``work_dir`` from the argument, the config, or ``./work_dirs/<config name>``."""
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(path))[0])
    return cfg


class DatasetMissingError(FileNotFoundError):
    """A config's dataset is not where the config says."""


_DATASET_HELP = {
    "ADE20KDataset": ("ADE20K (ADEChallengeData2016)", "images/{training,validation}/*.jpg, annotations/{training,validation}/*.png",
                      "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"),
    "CityscapesDataset": ("Cityscapes", "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png "
                          "(make labelTrainIds with `python -m mmseg ... tools/dataset_converters/cityscapes.py`)", "https://www.cityscapes-dataset.com/downloads/"),
    "PascalVOCDataset": ("Pascal VOC 2012 (+ SBD aug)", "VOC2012/JPEGImages/*.jpg, VOC2012/SegmentationClass[Aug]/*.png, VOC2012/ImageSets/Segmentation/{train,val,aug}.txt",
                         "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and SBD (mmseg docs: dataset_prepare.md#pascal-voc)"),
    "PascalContextDataset59": ("Pascal Context (59 classes)", "VOC2010/JPEGImages/*.jpg, VOC2010/SegmentationClassContext/*.png, VOC2010/ImageSets/SegmentationContext/{train,val}.txt",
                               "https://cs.stanford.edu/~roozbeh/pascal-context/ (mmseg docs: dataset_prepare.md#pascal-context)"),
    "COCOStuffDataset": ("COCO-Stuff 164k", "images/{train2017,val2017}/*.jpg, annotations/{train2017,val2017}/*_labelTrainIds.png",
                         "https://github.com/nightrome/cocostuff (convert with mmseg's tools/dataset_converters/coco_stuff164k.py)"),
}


def _dataset_cfgs(cfg: Config) -> Iterator[Any]:
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(key)
        if not loader:
            continue
        ds = loader.get("dataset")
        stack = [ds]
        while stack:
            d = stack.pop()
            if isinstance(d, (list, tuple)):
                stack.extend(d)
            elif isinstance(d, (dict, ConfigDict)):
                if "datasets" in d:
                    stack.extend(d["datasets"])
                elif "dataset" in d:
                    stack.append(d["dataset"])
                else:
                    yield d


def check_data_roots(cfg: Config) -> None:
    """Raise :class:`DatasetMissingError` naming the dataset, its layout and source if a
    data root of the config does not exist."""
    for ds in _dataset_cfgs(cfg):
        root = ds.get("data_root")
        dtype = str(ds.get("type", "?")).split(".")[-1]
        if dtype.startswith("Offline"):
            continue  # promptmatch's offline datasets build themselves
        if root is None or osp.isdir(root):
            continue
        name, layout, where = _DATASET_HELP.get(dtype, (dtype, "see the mmseg dataset docs", "mmseg docs: dataset_prepare.md"))
        raise DatasetMissingError(
            f"dataset {name} not found: data_root {root!r} does not exist.\n"
            f"  expected layout under data_root: {layout}\n"
            f"  get it from: {where}\n"
            f"  then point the config at it, e.g. --cfg-options "
            f"train_dataloader.dataset.data_root=/path val_dataloader.dataset.data_root=/path "
            f"test_dataloader.dataset.data_root=/path"
        )


def prepare_distributed(cfg: Config, launcher: str, device: Optional[str] = None) -> None:
    """Make mmengine's distributed launch work on CPU-only machines (gloo, DDP without devices),
    and give distributed runs the wrapper whose train step checks for divergence.

    ``device``: ``"cpu"`` takes the CPU set-up (gloo, no device ids) even where GPUs are
    visible (build the Runner inside :func:`mmengine_device` then, so that the model stays on
    the CPU); by default the GPU set-up is taken whenever CUDA is available.
    """
    if launcher == "none":
        return
    if torch.cuda.is_available() and device != "cpu":
        wrapper = dict(cfg.get("model_wrapper_cfg") or {})
        if wrapper.get("type", "MMDistributedDataParallel") == "MMDistributedDataParallel":
            wrapper["type"] = "promptmatch.PromptDistributedDataParallel"
        # the same DDP settings as on CPUs: DDP's own defaults (find_unused_parameters=False)
        # fail at the second iteration when a trainable parameter gets no gradient
        _ddp_defaults(wrapper, cfg)
        cfg.model_wrapper_cfg = wrapper
        return
    import torch.distributed as dist

    cfg.env_cfg = cfg.get("env_cfg", ConfigDict())
    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    if not dist.is_initialized():
        # mmengine's own init calls torch.cuda.set_device, which fails without a GPU
        dist.init_process_group(backend="gloo")
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    wrapper["type"] = "promptmatch.CPUDistributedDataParallel"
    _ddp_defaults(wrapper, cfg)
    cfg.model_wrapper_cfg = wrapper
    print_log(f"promptmatch: CPU distributed run, rank {dist.get_rank()} of {dist.get_world_size()} (gloo)",
              logger="current", level=logging.INFO)


def _ddp_defaults(wrapper: dict, cfg: Config) -> None:
    """DDP settings of promptmatch runs, unless the config sets them: the frozen backbone's
    buffers are never broadcast, and ``find_unused_parameters`` follows the config."""
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))


def add_prompt_hook(cfg: Config) -> None:
    """Add promptmatch.PromptCheckpointHook to a config's custom hooks (once)."""
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(str(h.get("type", "")).endswith("PromptCheckpointHook") for h in hooks):
        hooks.append(dict(type="promptmatch.PromptCheckpointHook"))
    cfg.custom_hooks = hooks
