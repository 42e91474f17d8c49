"""One cell of the grid: train, evaluate and measure one method on one backbone, dataset,
setting and seed, in this process (:func:`run_cell`) or a child of its own
(:func:`run_cell_in_child`, ``python -m promptmatch.benchmark --cell FILE``)."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from promptmatch.measure import reset_cuda_peak, run_python

from .common import (eval_precision, eval_sets, latency_ms, peak_memory_fields, peak_rss_mb, step_time_median,
                     weights_for)
from .spec import Cell, method_lrs, settings_label

__all__ = ["RECORD_VERSION", "run_cell", "run_cell_in_child", "error_record", "record_head", "sweep_lr", "sweep_pending",
           "eval_sets", "MemoryEngine"]

_logger = logging.getLogger(__name__)

RECORD_VERSION = 1


def _versions() -> Dict[str, str]:
    import numpy
    import timm
    import torch

    import promptmatch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "promptmatch": promptmatch.__version__, "platform": platform.platform()}


def record_head(cell: Cell) -> Dict[str, Any]:
    """The fields every record of a cell starts with."""
    s = cell.settings
    targets = [t["name"] for t in cell.dataset.get("targets") or []]
    rec = {"version": RECORD_VERSION, "key": cell.key, "method": cell.method, "method_name": cell.method_name,
           "method_cfg": cell.method_cfg, "backbone": cell.backbone, "dataset": cell.dataset["name"],
           "splits": cell.dataset["splits"], "settings": s, "setting_label": settings_label(s), "seed": cell.seed,
           "engine": s.get("engine") or "memory"}
    if targets:
        rec["eval_on"] = targets
    return rec


def diverged_fields(e: Any) -> Dict[str, Any]:
    """Record fields of a :class:`~promptmatch.DivergenceError`."""
    return dict(status="diverged", reason=str(e), diverged_at_step=e.step, diverged_loss=e.loss,
                diverged_lr=e.lr, diverged_what=e.reason, skipped_steps=e.skipped)


class _Unknown(Exception):
    """A learning rate the sweep rule asks for that the recorded trials lack."""


def _best_trial(trials: List[Dict[str, Any]]) -> Optional[float]:
    ok = [t for t in trials if t["status"] == "ok" and t["holdout_miou"] is not None
          and t["holdout_miou"] == t["holdout_miou"]]
    return max(ok, key=lambda t: t["holdout_miou"])["lr"] if ok else None


def _same_lr(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def _recorded(trials: Optional[List[Dict[str, Any]]], lr: float) -> Optional[Dict[str, Any]]:
    """A copy of the trial of ``lr`` among ``trials`` (recorded before), or None."""
    return next((dict(t) for t in trials or () if _same_lr(t["lr"], lr)), None)


def _sweep_settings(cell: Cell) -> Tuple[List[float], int]:
    """The cell's lr list and how far past its ends the sweep may go (setting ``lr_extend``)."""
    return method_lrs(cell.settings, cell.method, cell.method_name), int(cell.settings.get("lr_extend") or 0)


def _sweep_rule(grid: List[float], extend: int,
                result: Callable[[float], Dict[str, Any]]) -> Tuple[Optional[float], List[Dict[str, Any]]]:
    """Every lr of ``grid``, then, while the best held-out mIoU is at the lowest (highest) lr
    tried, one more step down (up) by the grid's ratio at that end, at most ``extend`` steps
    each way. ``result(lr)`` gives a trial; returns the best lr (None: every trial diverged)
    and the trials in the order run. A diverged trial counts as worst; ties go to the
    earlier trial."""
    trials = [result(lr) for lr in grid]
    ends = sorted(set(grid))
    if extend > 0 and len(ends) >= 2:
        ratio = {"down": ends[0] / ends[1], "up": ends[-1] / ends[-2]}
        taken = {"down": 0, "up": 0}
        while True:
            best = _best_trial(trials)
            tried = sorted(t["lr"] for t in trials)
            if best is None:
                break
            if _same_lr(best, tried[0]) and taken["down"] < extend:
                way, edge = "down", tried[0]
            elif _same_lr(best, tried[-1]) and taken["up"] < extend:
                way, edge = "up", tried[-1]
            else:
                break
            taken[way] += 1
            trials.append(result(float(f"{edge * ratio[way]:.12g}")))
    return _best_trial(trials), trials


def sweep_lr(cell: Cell, trial: Callable[[float], float],
             known: Optional[List[Dict[str, Any]]] = None) -> Tuple[Optional[float], List[Dict[str, Any]]]:
    """Run ``trial(lr)`` (held-out mIoU) for every learning rate of the cell's method, and
    beyond the list's ends while the best is at an end (setting ``lr_extend``); return the
    best lr (``None`` if every trial diverged) and the trials. A diverged trial counts as
    worst; ties go to the earlier lr. ``known``: trials recorded before (an earlier run of
    the cell), reused instead of run again."""
    from promptmatch.divergence import DivergenceError

    def result(lr: float) -> Dict[str, Any]:
        old = _recorded(known, lr)
        if old is not None:
            return old
        try:
            out = {"lr": lr, "holdout_miou": trial(lr), "status": "ok"}
        except DivergenceError as e:
            _logger.warning("lr trial %g diverged: %s", lr, e)
            out = {"lr": lr, "holdout_miou": None, "status": "diverged", "reason": str(e)}
        _logger.info("%s lr %g: held-out mIoU %s", cell.method, lr, out["holdout_miou"])
        return out

    return _sweep_rule(*_sweep_settings(cell), result)


def sweep_pending(cell: Cell, record: Mapping[str, Any]) -> bool:
    """Whether a finished record of ``cell`` lacks a trial its sweep rule asks for now (e.g.
    ``lr_extend`` was raised and its best lr is at an end), or chose another lr than the rule
    picks from its trials: then the cell runs again, reusing the recorded trials."""
    grid, extend = _sweep_settings(cell)
    trials = record.get("lr_trials")
    if record.get("status") != "ok" or len(grid) < 2 or not trials:
        return False

    def result(lr: float) -> Dict[str, Any]:
        old = _recorded(trials, lr)
        if old is None:
            raise _Unknown(lr)
        return old

    try:
        chosen, _ = _sweep_rule(grid, extend, result)
    except _Unknown:
        return True
    return chosen is None or not _same_lr(chosen, float(record.get("lr_chosen", float("nan"))))


def run_cell(cell: Union[Cell, Mapping[str, Any]], work_dir: Optional[Union[str, os.PathLike]] = None,
             launcher: str = "none", prior: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train and evaluate one cell in this process and return its record.

    The cell's engine (setting ``engine``) decides how: ``memory`` trains in this process on
    tensors (offline datasets and small folders); ``runner`` streams a folder through
    promptmatch's folder engine on mmengine's Runner (:mod:`.folder_cell`, no mmcv);
    ``mmengine`` builds an mmseg config and runs it through mmengine's Runner
    (:mod:`.mmseg_cell`), writing the config, logs and prompt checkpoint under ``work_dir``.

    With an lr sweep (a setting's ``lr`` mapping), each of the method's learning rates is
    tried on the training split minus a held-out part (``holdout``), the best on the held-out
    part is chosen (a diverged trial is worst), and the cell trains on the whole training
    split with it; the record holds ``lr_trials`` and ``lr_chosen``. With setting
    ``lr_extend`` the sweep goes on beyond the list's ends while the best lr is at one.
    ``prior``: the cell's earlier record (:func:`sweep_pending`): its trials are reused, and
    where the sweep still chooses its lr its final results are kept (``final_reused``).

    ``launcher="pytorch"`` (under ``torchrun``, every process calls this): the runner and
    mmengine engines train and evaluate data-parallel over the process group.

    A method that does not apply to the backbone (:class:`~promptmatch.MethodNotApplicableError`)
    gives a record with ``status: "skipped"`` and the reason; every other exception propagates
    (the grid records it as ``error`` with its traceback). Training that meets a non-finite
    loss or gradient (more than the spec's ``max_bad_steps`` times) gives ``status:
    "diverged"`` with the step, loss and learning rate and no mIoU.
    Peak memory is this process's peak RSS after training minus its peak before the model
    was built (CPU), or the CUDA allocator's peak (GPU): run one cell per process.
    """
    import torch

    import promptmatch as pm
    from promptmatch.divergence import DivergenceError

    cell = cell if isinstance(cell, Cell) else Cell.from_dict(cell)
    t_start = time.perf_counter()
    rec = record_head(cell)
    if cell.threads > 0:
        torch.set_num_threads(cell.threads)
    device = torch.device("cuda" if cell.device == "cuda" or (cell.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the cell asks for device 'cuda' (the spec's device), but torch {torch.__version__} sees no "
                           "CUDA GPU here; run it on a GPU machine, or set the spec's device to 'cpu' or 'auto'")
    rec["device"] = _device_label(device)
    if rec["engine"] == "mmengine":
        from .mmseg_cell import MmengineEngine

        engine: Any = MmengineEngine(cell, device, Path(work_dir) if work_dir else None, launcher)
    elif rec["engine"] == "runner":
        from .folder_cell import RunnerEngine

        engine = RunnerEngine(cell, device, Path(work_dir) if work_dir else None, launcher)
    else:
        engine = MemoryEngine(cell, device, Path(work_dir) if work_dir else None)
    try:
        # CPU peak memory: the process's peak RSS (ru_maxrss, a lifetime peak) over every
        # training of the cell, lr trials included (same model and batch), minus the peak
        # before the first model was built (engines set ``baseline_mb`` in ``prepare``)
        engine.prepare()
        lrs = method_lrs(cell.settings, cell.method, cell.method_name)
        lr = lrs[0]
        if len(lrs) > 1:
            lr, trials = sweep_lr(cell, engine.trial, known=(prior or {}).get("lr_trials"))
            rec.update(lr_trials=trials, holdout_fraction=cell.settings["holdout"])
            if lr is None:
                last = trials[-1]
                rec.update(status="diverged", reason="every lr of the sweep diverged: " + "; ".join(
                    f"lr {t['lr']:g}: {t.get('reason', '')}" for t in trials), diverged_at_step=None,
                    diverged_loss=None, diverged_lr=last["lr"], diverged_what="sweep", skipped_steps=[],
                    wall_s=time.perf_counter() - t_start, versions=_versions(), device=_device_label(engine.device))
                return rec
            rec["lr_chosen"] = lr
            if prior is not None and prior.get("status") == "ok" and _same_lr(lr, float(prior.get("lr_chosen", math.nan))):
                # the earlier record's final run used this lr: its results stand, with the trials added
                for k, v in prior.items():
                    if k not in rec or k in ("device", "versions"):
                        rec[k] = v
                rec.update(final_reused=prior.get("finished_at", True),
                           wall_s=float(prior.get("wall_s") or 0.0) + time.perf_counter() - t_start)
                return rec
        rec.update(engine.final(lr))
    except pm.MethodNotApplicableError as e:  # anything else is an error of the cell, with its traceback
        _logger.info("skipping %s on %s: %s", cell.method, cell.backbone["name"], e)
        rec.update(status="skipped", reason=f"{type(e).__name__}: {e}")
    except DivergenceError as e:  # a result of its own: never ranked, never an "ok" cell
        _logger.warning("cell diverged: %s", e)
        rec.update({k: v for k, v in getattr(engine, "partial", {}).items() if k not in ("miou", "per_class_iou")})
        rec.update(diverged_fields(e))
    else:
        rec["status"] = "ok"
    rec["device"] = _device_label(engine.device)  # where the model ran (an mmengine Runner chooses for itself)
    rec.update(wall_s=time.perf_counter() - t_start, versions=_versions())
    return rec


def _device_label(device: Any) -> str:
    """A record's ``device``: the GPU's name, or the CPU and its thread count."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


class MemoryEngine:
    """The in-process engine: tensors in memory, :func:`promptmatch.training.train_segmentor`."""

    def __init__(self, cell: Cell, device: Any, work_dir: Optional[Path] = None):
        self.cell, self.device, self.work_dir = cell, device, work_dir

    def prepare(self) -> None:
        from .data import entry_classes, memory_tensors

        c, size = self.cell, self.cell.settings["image_size"]
        train_split = c.dataset.get("train_split", "train")
        from promptmatch.backbones import input_normalisation

        self.normalisation = input_normalisation(c.backbone["name"])  # the segmentor's, before it is built
        self.train = memory_tensors(c.dataset, train_split, size, self.normalisation)
        self.evals = {key: memory_tensors(entry, split, size, self.normalisation) for key, entry, split in eval_sets(c)}
        self.classes = entry_classes(c.dataset)
        self.eval_classes = {key: self.classes if entry is c.dataset else entry_classes(entry)
                             for key, entry, split in eval_sets(c)}
        self.baseline_mb = peak_rss_mb()  # data loaded, no model yet
        self._build()  # a method that does not apply is skipped before any training

    def _build(self):
        import torch

        import promptmatch as pm

        c = self.cell
        torch.manual_seed(c.seed)
        weights, remap, pretrained = weights_for(c.backbone)
        return pm.create_segmentor(c.backbone["name"], c.method_name, len(self.classes), c.settings["decoder"],
                                   class_names=self.classes, method_cfg=c.method_cfg or None,
                                   decoder_cfg=c.settings.get("decoder_cfg"), weights=weights, weights_remap=remap,
                                   pretrained=pretrained, num_stages=c.backbone.get("num_stages"),
                                   backbone_kwargs=c.backbone.get("kwargs") or None).to(self.device)

    def _train(self, model, x, y, lr: float):
        from promptmatch.training import train_segmentor

        s = self.cell.settings
        wd = s.get("weight_decay")
        return train_segmentor(model, x, y, s["steps"], s["batch"], lr, seed=self.cell.seed, device=self.device,
                               max_bad_steps=self.cell.max_bad_steps, amp=s.get("amp"),
                               channels_last=bool(s.get("channels_last")), compile=bool(s.get("compile")),
                               weight_decay=0.01 if wd is None else wd)

    def _inference(self) -> Dict[str, Any]:
        """The setting's inference options (whole or sliding-window, autocast)."""
        s = self.cell.settings
        slide = s.get("eval_mode") == "slide"
        return dict(mode=s.get("eval_mode", "whole"), crop=s.get("eval_crop") if slide else None,
                    stride=s.get("eval_stride") if slide else None, amp=s.get("amp"))

    def _evaluate(self, model, x, y):
        from promptmatch.training import evaluate_segmentor

        s = self.cell.settings
        return evaluate_segmentor(model, x, y, len(self.classes), batch=s["eval_batch"], device=self.device,
                                  channels_last=bool(s.get("channels_last")), **self._inference())

    def trial(self, lr: float) -> float:
        from promptmatch.training import holdout_split

        x, y = self.train
        tr, ho = holdout_split(len(x), self.cell.settings["holdout"], seed=0)
        model = self._build()
        self._train(model, x[tr], y[tr], lr)
        return self._evaluate(model, x[ho], y[ho])[0]

    def final(self, lr: float) -> Dict[str, Any]:
        import torch

        import promptmatch as pm
        from promptmatch.inference import segment_logits

        c, s, device = self.cell, self.cell.settings, self.device
        out: Dict[str, Any] = {}
        self.partial = out  # what a diverged record keeps (the model's parameters)
        baseline_mb = self.baseline_mb
        model = self._build()
        out["method_config"] = model.method.config.to_dict()
        rep = pm.parameter_report(model)
        out.update(trainable_params=rep.trainable, backbone_params=rep.backbone_total,
                   trainable_pct=rep.percent_of_backbone(rep.trainable), parameters=rep.as_dict())
        reset_cuda_peak(device)
        run = self._train(model, *self.train, lr)
        times, losses = run["times"], run["losses"]
        out["skipped_steps"] = run["skipped"]
        step_s = step_time_median(times, s["warmup"])
        out.update(peak_memory_fields(device, baseline_mb))
        out.update(step_time_median_s=step_s, throughput_img_s=s["batch"] / step_s, train_s=float(sum(times)),
                   loss_first=losses[0], loss_last=losses[-1], lr_used=lr)
        model.eval()
        out["miou"], out["per_class_iou"] = {}, {}
        out["eval_precision"] = eval_precision(s)  # evaluate_segmentor and latency run under the setting's amp
        with torch.no_grad():
            for key, (x, y) in self.evals.items():
                m, per_class, _ = self._evaluate(model, x, y)
                out["miou"][key] = m
                out["per_class_iou"][key] = dict(zip(self.eval_classes[key], per_class))
            first = next(iter(self.evals.values()))[0]

            def infer(xi):
                segment_logits(model, xi.to(device), **self._inference())
            out["latency_ms_median"] = latency_ms(infer, [first[i % len(first)][None] for i in
                                                          range(min(s["latency_images"], len(first)) + 2)], device)
        extra = {"dataset": c.dataset["name"], "seed": c.seed, "lr": lr}
        if self.work_dir is not None:  # the cell's files: what it ran and its prompt checkpoint
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "cell.json").write_text(json.dumps(dict(c.to_dict(), lr=lr), indent=1) + "\n")
            ckpt = pm.save_prompts(model, self.work_dir / "prompts.safetensors", extra=extra)
            out.update(checkpoint=str(ckpt), checkpoint_bytes=Path(ckpt).stat().st_size,
                       config_file=str(self.work_dir / "cell.json"), work_dir=str(self.work_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
                ckpt = pm.save_prompts(model, Path(tmp) / "prompts.safetensors", extra=extra)
                out["checkpoint_bytes"] = Path(ckpt).stat().st_size
        return out


def run_cell_in_child(cell: Cell, timeout_s: Optional[float] = None,
                      work_dir: Optional[Union[str, os.PathLike]] = None,
                      prior: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Run :func:`run_cell` (with ``prior``) in a fresh ``python -m promptmatch.benchmark --cell`` process.

    A child that fails gives a record with ``status: "error"`` and the tail of its stderr.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pm-cell-") as tmp:
        cell_file, out_file = Path(tmp) / "cell.json", Path(tmp) / "record.json"
        cell_file.write_text(json.dumps(cell.to_dict()))
        # mmengine's Runner would take a GPU it sees: a CPU cell sees none
        env = {"CUDA_VISIBLE_DEVICES": ""} if cell.device == "cpu" else {}
        args = ["-m", "promptmatch.benchmark", "--cell", str(cell_file), "--record", str(out_file)]
        if work_dir is not None:
            args += ["--work-dir", str(work_dir)]
        if prior is not None:
            (Path(tmp) / "prior.json").write_text(json.dumps(prior))
            args += ["--prior", str(Path(tmp) / "prior.json")]
        res = run_python(args, timeout=timeout_s, env=env)
        if res.ok and out_file.is_file():
            return json.loads(out_file.read_text())
    rc = "timeout" if res.timed_out else res.returncode
    return error_record(cell, f"child exited with {rc}: {res.stderr[-4000:]}", time.perf_counter() - t0)


def error_record(cell: Cell, reason: str, wall_s: float) -> Dict[str, Any]:
    """The record of a cell that failed: :func:`record_head`'s fields, ``status: "error"`` and the reason."""
    return {**record_head(cell), "status": "error", "reason": reason, "wall_s": wall_s}

