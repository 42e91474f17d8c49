"""One cell of the grid: train, evaluate and measure one method on one backbone, dataset,
setting and seed, in this process (:func:`run_cell`) or a child of its own
(:func:`run_cell_in_child`, ``python -m promptmatch.benchmark --cell FILE``)."""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .spec import Cell, settings_label

__all__ = ["RECORD_VERSION", "run_cell", "run_cell_in_child", "error_record"]

_logger = logging.getLogger(__name__)

RECORD_VERSION = 1


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _weights_for(backbone: Mapping[str, Any]) -> Tuple[Optional[str], bool, bool]:
    """(weights path, weights_remap, pretrained) for a backbone entry."""
    from promptmatch.weights import list_offline_weights, offline_weights

    w = backbone.get("weights")
    if w in list_offline_weights():
        _, path, remap = offline_weights(w)
        return str(path), remap, False
    if w == "pretrained":
        return None, False, True
    return w, False, False


def _versions() -> Dict[str, str]:
    import numpy
    import timm
    import torch

    import promptmatch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "promptmatch": promptmatch.__version__, "platform": platform.platform()}


def _load_data(dataset: Mapping[str, Any], image_size: Optional[int]):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from promptmatch import datasets as pmdata

    if dataset.get("source", "offline") != "offline":
        raise NotImplementedError(f"dataset {dataset['name']!r}: source {dataset['source']!r} is not runnable by "
                                  "the benchmark tool yet (only offline datasets are)")
    path = pmdata.build_offline_dataset(dataset["name"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tensors(split: str):
        imgs, labels = pmdata.load_offline_split(path, split)
        x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255) - mean) / std
        y = torch.from_numpy(labels.astype(np.int64))
        if image_size and image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
            y = F.interpolate(y[:, None].float(), size=(image_size, image_size), mode="nearest")[:, 0].long()
        return x, y

    return tensors("train"), {s: tensors(s) for s in dataset["splits"]}, pmdata.dataset_classes(dataset["name"])


def run_cell(cell: Union[Cell, Mapping[str, Any]]) -> Dict[str, Any]:
    """Train and evaluate one cell in this process and return its record.

    A method that does not apply to the backbone (:class:`~promptmatch.MethodNotApplicableError`
    from :func:`promptmatch.create_segmentor`) gives a record with ``status: "skipped"`` and
    the reason; every other exception propagates (the grid records it as ``error`` with its
    traceback).
    Training that meets a non-finite loss or gradient (more than the spec's ``max_bad_steps``
    times) gives ``status: "diverged"`` with the step, loss and learning rate
    (``diverged_at_step``, ``diverged_loss``, ``diverged_lr``) and no mIoU.
    Peak memory is this process's peak RSS after training minus its peak before the model
    was built (CPU), or the CUDA allocator's peak (GPU): run one cell per process.
    """
    import numpy as np
    import torch

    import promptmatch as pm
    from promptmatch.divergence import DivergenceError
    from promptmatch.training import _sync, evaluate_segmentor, train_segmentor

    cell = cell if isinstance(cell, Cell) else Cell.from_dict(cell)
    t_start = time.perf_counter()
    s = cell.settings
    rec: Dict[str, Any] = {"version": RECORD_VERSION, "key": cell.key, "method": cell.method,
                           "method_name": cell.method_name, "method_cfg": cell.method_cfg,
                           "backbone": cell.backbone, "dataset": cell.dataset["name"], "splits": cell.dataset["splits"],
                           "settings": s, "setting_label": settings_label(s), "seed": cell.seed}
    if cell.threads > 0:
        torch.set_num_threads(cell.threads)
    device = torch.device("cuda" if cell.device == "cuda" or (cell.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    rec["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    (train_x, train_y), evals, classes = _load_data(cell.dataset, s["image_size"])
    k = len(classes)
    torch.manual_seed(cell.seed)
    baseline_mb = _maxrss_mb()
    weights, remap, pretrained = _weights_for(cell.backbone)
    try:
        model = pm.create_segmentor(cell.backbone["name"], cell.method_name, k, s["decoder"], class_names=classes,
                                    method_cfg=cell.method_cfg or None, decoder_cfg=s.get("decoder_cfg"),
                                    weights=weights, weights_remap=remap, pretrained=pretrained,
                                    num_stages=cell.backbone.get("num_stages"),
                                    backbone_kwargs=cell.backbone.get("kwargs") or None)
    except pm.MethodNotApplicableError as e:  # anything else is an error of the cell, with its traceback
        _logger.info("skipping %s on %s: %s", cell.method, cell.backbone["name"], e)
        rec.update(status="skipped", reason=f"{type(e).__name__}: {e}", wall_s=time.perf_counter() - t_start,
                   versions=_versions())
        return rec
    model.to(device)
    rec["method_config"] = model.method.config.to_dict()
    rep = pm.parameter_report(model)
    rec.update(trainable_params=rep.trainable, backbone_params=rep.backbone_total,
               trainable_pct=rep.percent_of_backbone(rep.trainable), parameters=rep.as_dict())

    # training (as tools/demo.py: AdamW, polynomial decay, random flips)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        run = train_segmentor(model, train_x, train_y, s["steps"], s["batch"], s["lr"], seed=cell.seed,
                              device=device, max_bad_steps=cell.max_bad_steps)
    except DivergenceError as e:  # a result of its own: never ranked, never an "ok" cell
        _logger.warning("cell diverged: %s", e)
        rec.update(status="diverged", reason=str(e), diverged_at_step=e.step, diverged_loss=e.loss,
                   diverged_lr=e.lr, diverged_what=e.reason, skipped_steps=e.skipped,
                   wall_s=time.perf_counter() - t_start, versions=_versions())
        return rec
    times, losses = run["times"], run["losses"]
    rec["skipped_steps"] = run["skipped"]
    warm = times[min(s["warmup"], len(times) - 1):]
    step_s = float(np.median(warm))
    if device.type == "cuda":
        rec.update(peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20, peak_mem_kind="cuda max_memory_allocated")
    else:
        peak = _maxrss_mb()
        rec.update(peak_mem_mb=peak - baseline_mb, peak_mem_kind="cpu peak RSS - baseline",
                   peak_rss_mb=peak, baseline_rss_mb=baseline_mb)
    rec.update(step_time_median_s=step_s, throughput_img_s=s["batch"] / step_s, train_s=float(sum(times)),
               loss_first=losses[0], loss_last=losses[-1])

    # evaluation
    model.eval()
    rec["miou"], rec["per_class_iou"] = {}, {}
    with torch.no_grad():
        for split, (x, y) in evals.items():
            m, per_class, _ = evaluate_segmentor(model, x, y, k, batch=s["eval_batch"], device=device)
            rec["miou"][split] = m
            rec["per_class_iou"][split] = dict(zip(classes, per_class))
        # latency: one image at a time
        first = next(iter(evals.values()))[0]
        n = min(s["latency_images"], len(first))
        lat = []
        for i in range(n + 2):
            xi = first[i % len(first): i % len(first) + 1].to(device)
            _sync(device)
            t0 = time.perf_counter()
            model(xi)
            _sync(device)
            if i >= 2:
                lat.append(time.perf_counter() - t0)
        rec["latency_ms_median"] = 1000 * float(np.median(lat))

    with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
        ckpt = pm.save_prompts(model, Path(tmp) / "prompts.safetensors",
                               extra={"dataset": cell.dataset["name"], "seed": cell.seed})
        rec["checkpoint_bytes"] = Path(ckpt).stat().st_size
    rec.update(status="ok", wall_s=time.perf_counter() - t_start, versions=_versions())
    return rec


def run_cell_in_child(cell: Cell, timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """Run :func:`run_cell` in a fresh ``python -m promptmatch.benchmark --cell`` process.

    A child that fails gives a record with ``status: "error"`` and the tail of its stderr.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pm-cell-") as tmp:
        cell_file, out_file = Path(tmp) / "cell.json", Path(tmp) / "record.json"
        cell_file.write_text(json.dumps(cell.to_dict()))
        env = dict(os.environ)
        # the child imports the same promptmatch as this process, installed or not
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("HF_HUB_OFFLINE", "1")
        cmd = [sys.executable, "-m", "promptmatch.benchmark", "--cell", str(cell_file), "--record", str(out_file)]
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout_s)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        if rc == 0 and out_file.is_file():
            return json.loads(out_file.read_text())
    return error_record(cell, f"child exited with {rc}: {err[-4000:]}", time.perf_counter() - t0)


def error_record(cell: Cell, reason: str, wall_s: float) -> Dict[str, Any]:
    s = cell.settings
    return {"version": RECORD_VERSION, "key": cell.key, "method": cell.method, "method_name": cell.method_name,
            "method_cfg": cell.method_cfg, "backbone": cell.backbone,
            "dataset": cell.dataset["name"], "splits": cell.dataset["splits"], "settings": s,
            "setting_label": settings_label(s), "seed": cell.seed, "status": "error",
            "reason": reason, "wall_s": wall_s}

