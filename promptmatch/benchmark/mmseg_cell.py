"""The mmengine engine of a benchmark cell: an mmseg config built from the cell (model base,
method through ``promptmatch.PromptEncoderDecoder``, dataset with its pipelines, schedule)
and run by mmengine's Runner, the code path of ``tools/train.py``.

Each run writes into the cell's work dir: ``config.py`` (the config it ran), mmengine's logs,
and ``prompts.safetensors`` (the per-dataset prompt checkpoint). Learning-rate trials run in
``lr_<i>/`` sub-folders on the training split minus its held-out part.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from promptmatch.measure import Stopwatch, cuda_peak_bytes, reset_cuda_peak

from .common import (eval_precision, eval_sets, latency_ms, peak_memory_fields, peak_rss_mb, step_time_median,
                     weights_for)
from .data import entry_classes, load_config_ref, mmseg_dataset_config, train_count
from .spec import ENGINE_WEIGHT_DECAY, Cell

__all__ = ["MmengineEngine", "build_cell_config"]

_logger = logging.getLogger(__name__)


def _model_base(cell: Cell, num_classes: int, crop: Tuple[int, int]) -> Dict[str, Any]:
    """The ``model`` dict of a cell: an mmseg model config made prompted, or a timm backbone
    (``promptmatch.TimmBackbone``) with the setting's decoder as an mmseg head."""
    b, s = cell.backbone, cell.settings
    norm = dict(type="BN", requires_grad=True)
    loss = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    if b.get("mmseg_model"):
        model = load_config_ref(b["mmseg_model"]).model.to_dict()
        if not isinstance(model.get("decode_head"), Mapping) or model.get("type") not in (None, "EncoderDecoder"):
            from .spec import SpecError

            raise SpecError(f"{b['mmseg_model']}: a {model.get('type')} with "
                            f"{'a cascade of decode heads' if isinstance(model.get('decode_head'), list) else 'its head'}"
                            " cannot be prompted; promptmatch.PromptEncoderDecoder takes EncoderDecoder models with "
                            "one decode_head (auxiliary heads allowed)")
        heads = model.get("auxiliary_head")
        for h in [model["decode_head"]] + (heads if isinstance(heads, list) else [heads] if heads else []):
            h["num_classes"] = num_classes
        model["pretrained"] = None  # never a download: the spec's local weights or the config's own init
        if b.get("weights"):
            model["backbone"]["init_cfg"] = dict(type="Pretrained", checkpoint=b["weights"])
        else:
            model["backbone"].pop("init_cfg", None)
            _logger.warning("%s: no weights given; the backbone of %s is randomly initialised", b["name"],
                            b["mmseg_model"])
        pre = dict(model.get("data_preprocessor") or dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                                                            std=[58.395, 57.12, 57.375], bgr_to_rgb=True))
    else:
        import promptmatch.mmseg  # noqa: F401
        from promptmatch.mmseg import TimmBackbone

        weights, remap, pretrained = weights_for(b)
        kwargs = dict(b.get("kwargs") or {})
        if pretrained:
            kwargs["pretrained"] = True
        backbone = dict(type="promptmatch.TimmBackbone", model_name=b["name"], weights=weights,
                        weights_remap=remap, num_stages=b.get("num_stages"), model_kwargs=kwargs)
        probe = TimmBackbone(b["name"], num_stages=b.get("num_stages"),
                             model_kwargs={k: v for k, v in kwargs.items() if k != "pretrained"})
        channels = probe.channels
        cfg = getattr(probe.model, "pretrained_cfg", None) or {}
        mean = [255 * v for v in cfg.get("mean", (0.485, 0.456, 0.406))]
        std = [255 * v for v in cfg.get("std", (0.229, 0.224, 0.225))]
        del probe
        dcfg = dict(s.get("decoder_cfg") or {})
        if s["decoder"] == "linear":
            head = dict(type="FCNHead", in_channels=channels[-1], in_index=len(channels) - 1, channels=channels[-1],
                        num_convs=0, concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm,
                        align_corners=False, loss_decode=loss)
        else:
            head = dict(type="SegformerHead", in_channels=list(channels), in_index=list(range(len(channels))),
                        channels=int(dcfg.get("embed_dim", 128)), dropout_ratio=float(dcfg.get("dropout", 0.1)),
                        num_classes=num_classes, norm_cfg=norm, align_corners=False, loss_decode=loss)
        model = dict(backbone=backbone, decode_head=head, pretrained=None)
        pre = dict(type="SegDataPreProcessor", mean=mean, std=std, bgr_to_rgb=True)
    pre.update(pad_val=0, seg_pad_val=255, size=tuple(crop), test_cfg=dict(size_divisor=32))
    model.update(type="promptmatch.PromptEncoderDecoder", method=cell.method_name, method_cfg=dict(cell.method_cfg),
                 max_bad_steps=cell.max_bad_steps, data_preprocessor=pre, train_cfg=dict())
    if s.get("eval_mode") == "slide":
        c, st = int(s["eval_crop"]), int(s["eval_stride"])
        model["test_cfg"] = dict(mode="slide", crop_size=(c, c), stride=(st, st))
    else:
        model["test_cfg"] = dict(mode="whole")
    return model


def _backbone_lr_mult(cell: Cell) -> float:
    from promptmatch.methods import get_method

    cls = get_method(cell.method_name)
    cfg = cls.config_class.from_dict(dict(cell.method_cfg))
    return float(getattr(cfg, "backbone_lr_mult", getattr(cls, "backbone_lr_mult", 1.0)))


def _loader(dataset: Dict[str, Any], batch: int, workers: int, train: bool) -> Dict[str, Any]:
    return dict(batch_size=batch if train else 1, num_workers=workers, persistent_workers=False,
                sampler=dict(type="InfiniteSampler" if train else "DefaultSampler", shuffle=train),
                dataset=dataset)


def build_cell_config(cell: Cell, work_dir: Path, lr: float, train_indices: Optional[List[int]] = None):
    """The mmengine ``Config`` of one run of a cell at learning rate ``lr`` (on the training
    samples ``train_indices`` only, for an lr trial)."""
    from mmengine.config import Config

    s = cell.settings
    classes = entry_classes(cell.dataset)
    size = s.get("image_size")
    crop = (int(size), int(size)) if size else (512, 512)
    train_ds, cfg_crop = mmseg_dataset_config(cell.dataset, cell.dataset.get("train_split", "train"), True, crop,
                                              train_indices, explicit_size=bool(size))
    if cfg_crop is not None and not size:
        crop = cfg_crop
    wd = s.get("weight_decay")
    optim = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=lr, betas=(0.9, 0.999),
                                                     weight_decay=ENGINE_WEIGHT_DECAY["mmengine"] if wd is None else wd))
    mult = _backbone_lr_mult(cell)
    if mult != 1.0:
        optim["paramwise_cfg"] = dict(custom_keys={"backbone": dict(lr_mult=mult)})
    if s.get("amp") == "bf16":
        optim.update(type="promptmatch.AutocastOptimWrapper", dtype="bfloat16")
    elif s.get("amp") == "fp16":
        optim.update(type="AmpOptimWrapper", loss_scale="dynamic")
    steps = int(s["steps"])
    model = _model_base(cell, len(classes), crop)
    model["class_names"] = list(classes)
    cfg = dict(
        default_scope="mmseg",
        work_dir=str(work_dir),
        model=model,
        train_dataloader=_loader(train_ds, int(s["batch"]), int(s.get("workers", 2)), True),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=steps, val_interval=steps + 1),
        optim_wrapper=optim,
        param_scheduler=[dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=steps, by_epoch=False)],
        default_hooks=dict(timer=dict(type="IterTimerHook"),
                           logger=dict(type="LoggerHook", interval=max(1, steps // 10), log_metric_by_epoch=False),
                           param_scheduler=dict(type="ParamSchedulerHook"), checkpoint=None,
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=[dict(type="promptmatch.PromptCheckpointHook")],
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        log_processor=dict(by_epoch=False),
        log_level="INFO",
        load_from=None,
        resume=False,
        randomness=dict(seed=int(cell.seed)),
    )
    if s.get("compile"):
        cfg["compile"] = True
    return Config(cfg)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _release(runner: Any) -> None:
    """Free what a finished Runner holds (its training iterator's workers, its logger's file,
    its registered logger/visualizer/message-hub instances, the model), so many runs in one
    process do not pile up memory, processes or open files."""
    import gc

    import torch
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.visualization import Visualizer

    loop = getattr(runner, "_train_loop", None)
    if loop is not None and not isinstance(loop, dict):
        for attr in ("dataloader_iterator", "_dataloader_iterator"):
            if hasattr(loop, attr):
                try:
                    delattr(loop, attr)
                except AttributeError:
                    pass
    name = getattr(runner, "_experiment_name", None) or getattr(runner, "experiment_name", None)
    for cls in (MMLogger, Visualizer, MessageHub):
        inst = cls._instance_dict.pop(name, None) if name else None
        for h in list(getattr(inst, "handlers", []) or []):
            if cls is MMLogger:
                h.close()
                inst.removeHandler(h)
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_peak_reader(device: Any) -> Callable[[], Optional[int]]:
    """What reads ``device``'s peak memory in bytes: CUDA's allocator peak on a CUDA device,
    nothing (``None``) elsewhere."""
    if getattr(device, "type", None) == "cuda":
        return lambda: cuda_peak_bytes(device)
    return lambda: None


class _StepTimer:
    """Wall time, loss and peak device memory of every training iteration (an mmengine hook,
    registered on the runner).

    The peak is read by ``peak_bytes`` (default: :func:`_device_peak_reader`) at the end of
    every iteration, before mmengine's logger runs: the logger's ``get_max_cuda_memory``
    resets CUDA's peak counter at every log interval, so one reading after training would
    miss every iteration before the last reset. :attr:`peak` is the maximum (``None`` when
    nothing was read, e.g. on the CPU).
    """

    #: before the LoggerHook (BELOW_NORMAL) at every iteration
    PRIORITY = "VERY_HIGH"

    def __init__(self, device: Any, peak_bytes: Optional[Callable[[], Optional[int]]] = None):
        from mmengine.hooks import Hook

        self.device = device
        self.times: List[float] = []
        self.losses: List[float] = []
        self.wall_s = float("nan")
        self.peak: Optional[int] = None
        self._peak_bytes = peak_bytes if peak_bytes is not None else _device_peak_reader(device)
        self._watch = Stopwatch(device)
        self._hook = type("BenchmarkStepTimer", (Hook,), {
            "priority": self.PRIORITY,
            "before_train_iter": lambda h, runner, batch_idx, data_batch=None: self._start(),
            "after_train_iter": lambda h, runner, batch_idx, data_batch=None, outputs=None: self._stop(outputs),
        })()

    def _start(self) -> None:
        self._watch.start()

    def _stop(self, outputs: Any) -> None:
        self.times.append(self._watch.stop())
        peak = self._peak_bytes()
        if peak is not None:
            self.peak = int(peak) if self.peak is None else max(self.peak, int(peak))
        if isinstance(outputs, Mapping) and "loss" in outputs:
            loss = outputs["loss"]
            self.losses.append(float(loss.detach() if hasattr(loss, "detach") else loss))


def _model_of(runner: Any) -> Any:
    """The model a Runner trains (inside its DDP wrapper, if any)."""
    return runner.model.module if hasattr(runner.model, "module") else runner.model


def _device_of(model: Any) -> Any:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


@contextlib.contextmanager
def _val_step_under(model: Any, amp: Optional[str], device_type: str) -> Iterator[None]:
    """Inside the block, ``model.val_step`` runs under the autocast that ``amp`` names (none:
    float32), as the in-memory engine evaluates.

    mmengine's ``ValLoop`` calls ``val_step`` inside its own ``autocast(enabled=False)`` (it
    autocasts only with ``fp16=True``, and then in float16): an autocast around the loop has
    no effect on the model, one inside ``val_step`` has.
    """
    from promptmatch.inference import autocast_context

    own = model.__dict__.get("val_step")
    original = model.val_step

    def val_step(*args: Any, **kwargs: Any) -> Any:
        with autocast_context(amp, device_type):
            return original(*args, **kwargs)

    model.val_step = val_step
    try:
        yield
    finally:
        if own is None:
            del model.val_step  # the class's method again
        else:
            model.val_step = own


class MmengineEngine:
    """Runs a cell's trials and final training through mmengine's Runner."""

    def __init__(self, cell: Cell, device: Any, work_dir: Optional[Path], launcher: str = "none"):
        import tempfile

        self.cell, self.device, self.launcher = cell, device, launcher
        if work_dir is None:  # in-process use without an output folder: a temporary one
            self._tmp = tempfile.TemporaryDirectory(prefix="pm-cell-")
            work_dir = Path(self._tmp.name)
        self.work_dir = Path(work_dir)

    def prepare(self) -> None:
        import promptmatch.mmseg  # noqa: F401  (registers promptmatch's types; says what to install if missing)
        from promptmatch.methods import get_method

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.classes = entry_classes(self.cell.dataset)
        self.baseline_mb = peak_rss_mb()  # before any Runner or model
        get_method(self.cell.method_name)

    def _runner(self, work_dir: Path, lr: float, train_indices: Optional[List[int]] = None):
        from mmengine.runner import Runner

        from promptmatch.mmseg.runtime import mmengine_device, prepare_distributed

        cfg = build_cell_config(self.cell, work_dir, lr, train_indices)
        work_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump(str(work_dir / "config.py"))
        cfg.launcher = self.launcher
        want = self.device.type
        prepare_distributed(cfg, self.launcher, device=want)  # torchrun: mmengine's DDP (gloo on CPUs)
        cfg["experiment_name"] = f"pm-{work_dir.name}-{time.time_ns()}"
        # mmengine would put the model on any GPU it sees, a CPU cell's too
        with mmengine_device(want):
            runner = Runner.from_cfg(cfg)
        got = _device_of(_model_of(runner))
        if got.type != want:
            _release(runner)
            hint = "run it with the GPUs hidden (CUDA_VISIBLE_DEVICES=)" if want == "cpu" else "is a GPU visible here?"
            raise RuntimeError(f"mmengine's Runner put the model of this {want} cell on {got}; {hint}")
        self.device = got  # where it runs (the rank's GPU under torchrun), what the record says
        return runner, cfg

    def _train(self, runner) -> _StepTimer:
        from promptmatch.divergence import DivergenceError
        from promptmatch.mmseg.runtime import trust_checkpoints_under

        model = _model_of(runner)
        self.device = _device_of(model)  # where it runs
        timer = _StepTimer(self.device)
        runner.register_hook(timer._hook)
        t0 = time.perf_counter()
        with trust_checkpoints_under(str(runner.work_dir)):
            runner.train()
        timer.wall_s = time.perf_counter() - t0  # data loading included
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        guard = getattr(model, "divergence_guard", None)
        if guard is not None and guard.skipped and not guard.last_step_ok:
            raise DivergenceError(f"training diverged: it ended on an iteration skipped as non-finite "
                                  f"({guard.summary()})", step=len(timer.times) - 1,
                                  loss=timer.losses[-1] if timer.losses else float("nan"), lr=None,
                                  skipped=list(guard.skipped[:-1]), reason="loss")
        return timer

    def _evaluate(self, runner, dataset: Dict[str, Any], classes: List[str]) -> Tuple[float, Dict[str, Any], Any]:
        from mmengine.runner import ValLoop

        loop = ValLoop(runner, _loader(dataset, 1, int(self.cell.settings.get("workers", 2)), False),
                       dict(type="promptmatch.PerClassIoUMetric", iou_metrics=["mIoU"]))
        runner._val_loop = loop  # the hooks (timer, logger) read the runner's val loop
        # in the precision the memory engine evaluates in (the setting's amp): see eval_precision
        with _val_step_under(runner.model, self.cell.settings.get("amp"), self.device.type):
            metrics = loop.run()
        per_class = {}
        for name in classes:
            v = metrics.get(f"IoU.{name}")
            per_class[name] = None if v is None or v != v else float(v) / 100
        return float(metrics["mIoU"]) / 100, per_class, loop

    def _dataset(self, entry: Mapping[str, Any], split: str, indices: Optional[List[int]] = None) -> Dict[str, Any]:
        s = self.cell.settings
        size = s.get("image_size")
        crop = (int(size), int(size)) if size else (512, 512)
        return mmseg_dataset_config(entry, split, False, crop, indices, explicit_size=bool(size))[0]

    def trial(self, lr: float) -> float:
        from promptmatch.training import holdout_split

        idx = getattr(self, "_trial_idx", None)
        if idx is None:
            idx = self._trial_idx = holdout_split(train_count(self.cell.dataset), self.cell.settings["holdout"], seed=0)
        tr, ho = idx
        n = self._n_trials = getattr(self, "_n_trials", -1) + 1
        runner, _ = self._runner(self.work_dir / f"lr_{n}", lr, tr)
        try:
            self._train(runner)
            held = self._dataset(self.cell.dataset, self.cell.dataset.get("train_split", "train"), ho)
            return self._evaluate(runner, held, self.classes)[0]
        finally:
            _release(runner)

    def final(self, lr: float) -> Dict[str, Any]:
        import torch

        from promptmatch import parameter_report

        s = self.cell.settings
        baseline_mb = self.baseline_mb
        runner, cfg = self._runner(self.work_dir, lr)
        reset_cuda_peak(self.device)
        out: Dict[str, Any] = {"config_file": str(self.work_dir / "config.py"), "work_dir": str(self.work_dir)}
        self.partial = out  # what a diverged record keeps
        model = _model_of(runner)
        rep = parameter_report(model)
        out.update(method_config=model.method.config.to_dict(), trainable_params=rep.trainable,
                   backbone_params=rep.backbone_total, trainable_pct=rep.percent_of_backbone(rep.trainable),
                   parameters=rep.as_dict())
        timer = self._train(runner)
        # the peak of every step (mmengine's logger resets CUDA's counter at each log interval)
        out.update(peak_memory_fields(self.device, baseline_mb, step_peak_bytes=timer.peak))
        times = timer.times
        step_s = step_time_median(times, s["warmup"])
        world = _world_size()
        out.update(step_time_median_s=step_s, throughput_img_s=world * s["batch"] / step_s, train_s=float(sum(times)),
                   train_wall_s=timer.wall_s, throughput_e2e_img_s=world * s["batch"] * len(times) / timer.wall_s,
                   loss_first=timer.losses[0] if timer.losses else None,
                   loss_last=timer.losses[-1] if timer.losses else None, lr_used=lr,
                   skipped_steps=list(getattr(getattr(model, "divergence_guard", None), "skipped", []) or []))
        out["miou"], out["per_class_iou"] = {}, {}
        out["eval_precision"] = eval_precision(s)
        first_loop = None
        for key, entry, split in eval_sets(self.cell):
            classes = self.classes if entry is self.cell.dataset else entry_classes(entry)
            m, per_class, loop = self._evaluate(runner, self._dataset(entry, split), classes)
            out["miou"][key], out["per_class_iou"][key] = m, per_class
            first_loop = first_loop or loop
        # latency: mmseg's whole test step (preprocessing, whole or sliding-window inference) on one image
        model.eval()
        n = int(s["latency_images"]) + 2  # two warm-up calls
        samples = []
        for data in first_loop.dataloader:
            samples.append(data)
            if len(samples) >= n:
                break
        samples = [samples[i % len(samples)] for i in range(n)]  # a small val split is timed again
        from promptmatch.inference import autocast_context

        with torch.no_grad(), autocast_context(s.get("amp"), self.device.type):
            out["latency_ms_median"] = latency_ms(model.test_step, samples, self.device)
        ckpt = self.work_dir / "prompts.safetensors"
        if ckpt.is_file():
            out.update(checkpoint=str(ckpt), checkpoint_bytes=ckpt.stat().st_size)
        return out
