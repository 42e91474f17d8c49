"""Training and evaluating a prompted segmentor on a folder dataset through mmengine's Runner.

:class:`FolderTrainConfig` holds every option (each with the default of mmseg's recipe that
the mmseg engine uses: AdamW, lr 1e-4, weight decay 0.05, poly decay with power 0.9 to zero,
512 x 512 crops of images resized by 0.5-2.0, ``cat_max_ratio`` 0.75, flip, photometric
distortion). :func:`build_runner` builds the Runner in code (no config file);
:func:`train_folder` runs it and writes the prompt checkpoint, the merged segmentor file and
``metrics.json``; :func:`evaluate_folder` scores a segmentor on a split with the same
evaluation as training's validation. Under ``torchrun`` training is data-parallel through
mmengine's launcher (gloo on CPUs, nccl on CUDA).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..datasets.folder import FolderDataset, check_folder_dataset, describe_folder_dataset
from .compat import mmengine_device, trust_checkpoints_under
from .data import FolderSegDataset, SegCollate
from .hooks import MetricsHook, ProgressHook, StepTimerHook
from .metric import IoUMetric
from .model import DDP_WRAPPER_NAME, SegmentorModel, build_optim_wrapper
from .transforms import TrainAugment, recipe_scale

__all__ = ["FolderTrainConfig", "build_segmentor", "build_runner", "train_folder", "evaluate_folder",
           "resolve_launcher", "release_runner", "PROMPTS_FILE", "MERGED_FILE", "METRICS_FILE"]

_logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.safetensors"
MERGED_FILE = "segmentor.safetensors"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "train_config.json"


@dataclass
class FolderTrainConfig:
    """Every option of a training run on a folder dataset (see ``python -m promptmatch.train --help``).

    Data: ``folder`` (the root with ``img_dir/`` and ``ann_dir/``), ``classes`` (default: the
    folder's classes file), the splits and, to train and validate on parts of them (an lr
    trial), ``train_indices``/``val_indices``. Model: a timm ``backbone`` name with local
    ``weights`` (or timm's ``pretrained`` ones, or a random init), the tuning ``method`` and
    ``decoder`` with their configs. Schedule: ``steps`` iterations of ``batch`` crops per process.
    Evaluation: ``eval_mode`` whole or slide (``eval_crop``/``eval_stride`` default to the crop
    and two thirds of it), images resized to the recipe's test scale unless ``eval_resize`` is off.
    """

    folder: str
    backbone: str
    out: str
    method: str = "spm"
    decoder: str = "linear"
    weights: Optional[str] = None
    pretrained: bool = False
    weights_remap: bool = False
    method_cfg: Optional[Dict[str, Any]] = None
    decoder_cfg: Optional[Dict[str, Any]] = None
    backbone_kwargs: Optional[Dict[str, Any]] = None
    num_stages: Optional[int] = None
    classes: Optional[List[str]] = None
    reduce_zero_label: bool = False
    img_suffix: Optional[str] = None
    seg_map_suffix: str = ".png"
    train_split: str = "train"
    val_split: str = "val"
    train_indices: Optional[List[int]] = None
    val_indices: Optional[List[int]] = None
    steps: int = 2000
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    crop: int = 512
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    eval_resize: bool = True
    eval_mode: str = "whole"
    eval_crop: Optional[int] = None
    eval_stride: Optional[int] = None
    amp: Optional[str] = None
    #: "cpu" or "cuda"; None: "cuda" when a GPU is visible (mmengine's choice), else "cpu"
    device: Optional[str] = None
    seed: int = 0
    workers: int = 2
    checkpoint_interval: Optional[int] = None
    keep_checkpoints: int = 2
    val_interval: Optional[int] = None
    log_interval: Optional[int] = None
    resume: bool = False
    max_bad_steps: int = 0
    launcher: str = "auto"
    find_unused_parameters: bool = False
    progress: bool = True
    check_data: bool = True
    save_merged: bool = True
    log_level: str = "INFO"
    extra: Dict[str, Any] = field(default_factory=dict)

    def problems(self) -> List[str]:
        """What is wrong with these options, each with its fix (empty: nothing)."""
        out: List[str] = []
        for name in ("steps", "batch", "crop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                out.append(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            out.append(f"lr must be positive, got {self.lr!r}")
        if self.eval_mode not in ("whole", "slide"):
            out.append(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}")
        if self.amp not in (None, "bf16", "fp16"):
            out.append(f"amp must be none, 'bf16' or 'fp16', got {self.amp!r}")
        if self.launcher not in ("auto", "none", "pytorch"):
            out.append(f"launcher must be 'auto', 'none' or 'pytorch', got {self.launcher!r}")
        if self.device not in (None, "cpu", "cuda"):
            out.append(f"device must be 'cpu', 'cuda' or none (a GPU when one is visible), got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            out.append("device 'cuda' asked for, but torch sees no CUDA GPU here; use device 'cpu'")
        if self.amp == "fp16" and (self.device == "cpu" or not torch.cuda.is_available()):
            out.append("amp 'fp16' needs a CUDA GPU and none is visible; use amp 'bf16' (CPU or GPU) or none")
        if self.workers < 0:
            out.append(f"workers must be 0 or more, got {self.workers!r}")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            out.append(f"weights file {self.weights} does not exist: give the path of a local .safetensors/.pth "
                       "file of the backbone's weights, or leave --weights out (random init)")
        return out

    def eval_options(self) -> Dict[str, Any]:
        """How validation predicts: mode, crop, stride, resize scale and autocast."""
        crop = (self.eval_crop or self.crop,) * 2
        stride = (self.eval_stride or max(1, 2 * crop[0] // 3),) * 2
        return {"eval_mode": self.eval_mode, "eval_crop": list(crop), "eval_stride": list(stride),
                "eval_scale": list(recipe_scale((self.crop, self.crop))) if self.eval_resize else None,
                "amp": self.amp}

    def to_dict(self) -> Dict[str, Any]:
        """The options as JSON-ready values."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def resolve_launcher(launcher: str) -> str:
    """``"pytorch"`` under ``torchrun`` with more than one process (for ``"auto"``), else ``"none"``."""
    if launcher == "auto":
        return "pytorch" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "none"
    return launcher


def describe(cfg: FolderTrainConfig) -> FolderDataset:
    """The folder dataset of a run (its training and validation splits)."""
    splits = tuple(dict.fromkeys([cfg.train_split, cfg.val_split]))
    return describe_folder_dataset(cfg.folder, classes=cfg.classes, splits=splits, img_suffix=cfg.img_suffix,
                                   seg_map_suffix=cfg.seg_map_suffix, reduce_zero_label=cfg.reduce_zero_label)


def build_segmentor(backbone: str, method: str, num_classes: int, *, decoder: str = "linear",
                    class_names: Optional[Sequence[str]] = None, weights: Optional[str] = None,
                    pretrained: bool = False, weights_remap: bool = False,
                    method_cfg: Optional[Dict[str, Any]] = None, decoder_cfg: Optional[Dict[str, Any]] = None,
                    backbone_kwargs: Optional[Dict[str, Any]] = None, num_stages: Optional[int] = None,
                    seed: int = 0) -> nn.Module:
    """A :func:`promptmatch.create_segmentor` model built after seeding torch with ``seed``, so a
    randomly initialised backbone is the same each time (prompt checkpoints check it)."""
    from ..segmentor import create_segmentor

    torch.manual_seed(int(seed))
    return create_segmentor(backbone, method, num_classes, decoder, method_cfg=method_cfg or None,
                            decoder_cfg=decoder_cfg or None, class_names=list(class_names) if class_names else None,
                            weights=weights, pretrained=pretrained, weights_remap=weights_remap,
                            num_stages=num_stages, backbone_kwargs=backbone_kwargs or None)


def _check_crop(segmentor: nn.Module, crop: int) -> None:
    from ..predict import size_rule

    try:
        size_rule(segmentor).check_crop((crop, crop))
    except ValueError as e:
        raise ValueError(f"crop size {crop} does not fit the backbone: {e} (option --crop)") from None


def _loader(dataset: FolderSegDataset, batch: int, workers: int, train: bool, collate: SegCollate) -> Dict[str, Any]:
    return dict(dataset=dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                sampler=dict(type="InfiniteSampler" if train else "DefaultSampler", shuffle=train),
                collate_fn=collate)


def build_runner(cfg: FolderTrainConfig, segmentor: nn.Module, folder: FolderDataset,
                 hooks: Sequence[Any] = ()) -> Any:
    """mmengine's Runner for ``cfg`` around ``segmentor``: data, model, AdamW with a poly
    schedule in the wrapper the ``amp`` option calls for, validation with :class:`IoUMetric`,
    checkpoints every ``checkpoint_interval`` iterations (the last kept), resume, DDP."""
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner

    launcher = resolve_launcher(cfg.launcher)
    cuda = run_device(cfg) == "cuda"
    if launcher == "pytorch" and not cuda:
        import torch.distributed as dist

        if not dist.is_initialized():  # mmengine's own init selects a CUDA device, which fails without one
            dist.init_process_group(backend="gloo")
    device_type = "cuda" if cuda else "cpu"
    k = folder.num_classes
    crop = (cfg.crop, cfg.crop)
    ev = cfg.eval_options()
    augment = TrainAugment(crop=crop, ratio_range=tuple(cfg.ratio_range), cat_max_ratio=cfg.cat_max_ratio,
                           photometric=cfg.photometric, ignore_index=folder.ignore_index)
    norm = getattr(segmentor, "input_normalisation", None)
    train_ds = FolderSegDataset(folder, cfg.train_split, augment=augment, indices=cfg.train_indices, seed=cfg.seed,
                                normalisation=norm)
    val_ds = FolderSegDataset(folder, cfg.val_split, eval_scale=ev["eval_scale"], indices=cfg.val_indices,
                              normalisation=norm)
    model = SegmentorModel(segmentor, eval_mode=cfg.eval_mode, eval_crop=tuple(ev["eval_crop"]),
                           eval_stride=tuple(ev["eval_stride"]), amp=cfg.amp, max_bad_steps=cfg.max_bad_steps)
    optim = build_optim_wrapper(segmentor, cfg.lr, cfg.weight_decay, cfg.amp, device_type)
    steps = cfg.steps
    ckpt_every = cfg.checkpoint_interval or min(steps, 1000)
    log_every = cfg.log_interval or max(1, min(50, steps // 10))
    metric = IoUMetric(k, ignore_index=folder.ignore_index, class_names=folder.classes)
    return Runner(
        model=model,
        work_dir=str(cfg.out),
        train_dataloader=_loader(train_ds, cfg.batch, cfg.workers, True, SegCollate(crop, folder.ignore_index)),
        val_dataloader=_loader(val_ds, 1, cfg.workers, False, SegCollate(None, folder.ignore_index)),
        val_evaluator=Evaluator([metric]),
        train_cfg=dict(by_epoch=False, max_iters=steps, val_interval=cfg.val_interval or steps),
        val_cfg=dict(),
        optim_wrapper=optim,
        param_scheduler=[dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=steps, by_epoch=False)],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=log_every, log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=ckpt_every,
                            max_keep_ckpts=cfg.keep_checkpoints, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=[ProgressHook(cfg.progress), *hooks],
        launcher=launcher,
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="nccl" if cuda else "gloo")),
        log_processor=dict(by_epoch=False),
        log_level=cfg.log_level,
        randomness=dict(seed=int(cfg.seed)),
        resume=cfg.resume,
        experiment_name=f"pm-{Path(cfg.out).name}-{time.time_ns()}",
        cfg=dict(model_wrapper_cfg=dict(type=DDP_WRAPPER_NAME, find_unused_parameters=cfg.find_unused_parameters)),
    )


def release_runner(runner: Any) -> None:
    """Close what a finished Runner holds (its log file, its named logger/visualizer/message-hub
    instances), so several runs in one process do not pile up open files and memory."""
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.visualization import Visualizer

    name = getattr(runner, "_experiment_name", None)
    for cls in (MMLogger, Visualizer, MessageHub):
        inst = cls._instance_dict.pop(name, None) if name else None
        if cls is MMLogger and inst is not None:
            for h in list(inst.handlers):
                h.close()
                inst.removeHandler(h)


def _unwrap(model: nn.Module) -> SegmentorModel:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_device(cfg: FolderTrainConfig) -> str:
    """The device type a run trains on: the option's, else ``"cuda"`` when a GPU is visible."""
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def train_folder(cfg: FolderTrainConfig, hooks: Sequence[Any] = (), save: bool = True) -> Dict[str, Any]:
    """Train ``cfg.method`` on the folder ``cfg.folder`` and validate it; return what happened.

    Checks the options and the data first (every problem at once, nothing trained). The main
    process writes ``train_config.json`` into ``cfg.out`` and, with ``save``,
    ``prompts.safetensors`` (the prompt checkpoint; its ``extra`` records the options, the
    evaluation settings and the val mIoU), ``segmentor.safetensors`` (the merged file, unless
    ``save_merged`` is off) and ``metrics.json``; mmengine writes its logs and ``iter_<n>.pth``
    checkpoints there too. Returns ``metrics`` (of the last validation), ``val_miou``,
    ``times``/``losses``/``iters`` of this run's iterations, the paths written (``prompts``,
    ``merged``, ``metrics_file``) and the model (``segmentor``).

    Raises ``ValueError`` for bad options, :class:`~promptmatch.datasets.folder.FolderDatasetError`
    for bad data and :class:`~promptmatch.DivergenceError` when training diverges.
    """
    from ..divergence import DivergenceError

    bad = cfg.problems()
    if bad:
        raise ValueError("bad training options:\n  - " + "\n  - ".join(bad))
    folder = describe(cfg)
    if cfg.check_data:
        check_folder_dataset(folder, check_labels=True)
    segmentor = build_segmentor(cfg.backbone, cfg.method, folder.num_classes, decoder=cfg.decoder,
                                class_names=folder.classes, weights=cfg.weights, pretrained=cfg.pretrained,
                                weights_remap=cfg.weights_remap, method_cfg=cfg.method_cfg,
                                decoder_cfg=cfg.decoder_cfg, backbone_kwargs=cfg.backbone_kwargs,
                                num_stages=cfg.num_stages, seed=cfg.seed)
    _check_crop(segmentor, cfg.crop)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timer, metrics_hook = StepTimerHook(), MetricsHook()
    device = run_device(cfg)
    # mmengine would put the model on a GPU whenever one is visible: the run's device instead
    with mmengine_device(device):
        runner = build_runner(cfg, segmentor, folder, hooks=[timer, metrics_hook, *hooks])
    try:
        if _is_main():  # what ran, also for runs that save nothing else (lr trials)
            (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        timer._watch.device = torch.device(device)
        t0 = time.perf_counter()
        with trust_checkpoints_under(out), mmengine_device(device):
            runner.train()
            if metrics_hook.metrics is None:  # resumed a finished run: validate it again
                runner.val()
        wall = time.perf_counter() - t0
        model = _unwrap(runner.model)
        guard = model.divergence_guard
        if guard.skipped and not guard.last_step_ok:
            raise DivergenceError(f"training diverged: it ended on an iteration skipped as non-finite "
                                  f"({guard.summary()})", step=cfg.steps - 1,
                                  loss=timer.losses[-1] if timer.losses else float("nan"), lr=None,
                                  skipped=list(guard.skipped[:-1]), reason="loss")
        metrics = dict(metrics_hook.metrics or {})
        result: Dict[str, Any] = {"metrics": metrics, "val_miou": metrics.get("mIoU"), "times": timer.times,
                                  "losses": timer.losses, "iters": timer.iters, "train_wall_s": wall,
                                  "step_peak_bytes": timer.peak,
                                  "skipped_steps": list(guard.skipped), "segmentor": model.segmentor,
                                  "work_dir": str(out), "device": str(next(model.parameters()).device)}
        if save and _is_main():
            result.update(write_outputs(cfg, folder, model.segmentor, metrics))
        _barrier()  # the other processes wait until the files are written
        return result
    finally:
        release_runner(runner)


def write_outputs(cfg: FolderTrainConfig, folder: FolderDataset, segmentor: nn.Module,
                  metrics: Dict[str, float]) -> Dict[str, str]:
    """Write the prompt checkpoint, the merged file and ``metrics.json`` of a finished run."""
    from ..checkpoint import save_prompts
    from ..merged import save_segmentor

    out = Path(cfg.out)
    extra = {"engine": "runner", "folder": str(folder.root), "train_split": cfg.train_split,
             "val_split": cfg.val_split, "backbone": cfg.backbone, "weights": cfg.weights,
             "pretrained": cfg.pretrained, "weights_remap": cfg.weights_remap,
             "backbone_kwargs": cfg.backbone_kwargs, "num_stages": cfg.num_stages, "seed": cfg.seed,
             "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "crop": cfg.crop,
             "reduce_zero_label": cfg.reduce_zero_label, "val_miou": metrics.get("mIoU"),
             "world_size": _world_size(), **cfg.eval_options(),
             **cfg.extra}
    paths = {"prompts": str(save_prompts(segmentor, out / PROMPTS_FILE, extra=extra))}
    if cfg.save_merged:
        paths["merged"] = str(save_segmentor(segmentor, out / MERGED_FILE, extra=extra,
                                             backbone_kwargs=cfg.backbone_kwargs or None))
    record = {"val_miou": metrics.get("mIoU"), "split": cfg.val_split, "metrics": metrics,
              "iterations": cfg.steps, **{k: v for k, v in extra.items() if k != "val_miou"}}
    (out / METRICS_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    paths["metrics_file"] = str(out / METRICS_FILE)
    return paths


@torch.no_grad()
def evaluate_folder(segmentor: nn.Module, folder: FolderDataset, split: str, *, eval_mode: str = "whole",
                    eval_crop: Optional[Sequence[int]] = None, eval_stride: Optional[Sequence[int]] = None,
                    eval_scale: Optional[Sequence[int]] = None, amp: Optional[str] = None,
                    indices: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
                    workers: int = 0, progress: bool = False) -> Dict[str, float]:
    """The metrics (:class:`IoUMetric`: mIoU, mAcc, aAcc, ``IoU.<class>``) of ``segmentor`` on one
    split, predicted as training's validation does (same resize, mode, crop, stride, autocast)."""
    from torch.utils.data import DataLoader

    device = device or next(segmentor.parameters()).device
    segmentor.to(device)
    ds = FolderSegDataset(folder, split, eval_scale=tuple(eval_scale) if eval_scale else None, indices=indices,
                          normalisation=getattr(segmentor, "input_normalisation", None))
    model = SegmentorModel(segmentor, eval_mode=eval_mode, eval_crop=tuple(eval_crop) if eval_crop else None,
                           eval_stride=tuple(eval_stride) if eval_stride else None, amp=amp).to(device)
    model.eval()
    metric = IoUMetric(folder.num_classes, ignore_index=folder.ignore_index, class_names=folder.classes)
    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, collate_fn=SegCollate(None))
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc=f"evaluate {split}", unit="img", disable=not progress):
        metric.process(batch, model.val_step(batch))
    return metric.compute_metrics(metric.results)
