"""The ``runner`` engine of a benchmark cell: a folder dataset trained and evaluated through
mmengine's Runner by :mod:`promptmatch.engine` (promptmatch's own segmentor, no mmcv/mmseg).

:class:`RunnerEngine` has the interface of the other engines (``prepare``, ``trial(lr)``,
``final(lr)``) and gives the record fields they give; :func:`~.cell.run_cell` runs a cell with
it (lr sweep on the held-out part of the training split, seeds, domain-shift targets,
divergence and skipped methods) as it runs the other engines. Each run writes into
the cell's work dir: ``train_config.json``, mmengine's logs, the last ``iter_<n>.pth`` and
``prompts.safetensors``; lr trials run in ``lr_<i>/``.
"""
from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from promptmatch.measure import reset_cuda_peak

from .common import eval_precision, eval_sets, latency_ms, peak_memory_fields, peak_rss_mb, step_time_median, weights_for
from .data import entry_classes, entry_source, folder_of, memory_tensors
from .errors import SpecError
from .spec import Cell

__all__ = ["RunnerEngine", "RUNNER_LR", "RUNNER_WEIGHT_DECAY"]

_logger = logging.getLogger(__name__)

#: the defaults of the runner engine: mmseg's recipe, as the mmengine engine's
RUNNER_LR = 1e-4
RUNNER_WEIGHT_DECAY = 0.05


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _nan_to_none(v: Any) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class RunnerEngine:
    """Runs a cell's lr trials and final training on a folder dataset through mmengine's Runner."""

    def __init__(self, cell: Cell, device: Any, work_dir: Optional[Path] = None, launcher: str = "none") -> None:
        self.cell, self.device, self.launcher = cell, device, launcher
        if work_dir is None:  # in-process use without an output folder: a temporary one
            self._tmp = tempfile.TemporaryDirectory(prefix="pm-cell-")
            work_dir = Path(self._tmp.name)
        self.work_dir = Path(work_dir)

    def prepare(self) -> None:
        """Check that the dataset is a folder, and build the model once: a method that does not
        apply to the backbone is skipped before any training."""
        if entry_source(self.cell.dataset).name != "folder":
            raise SpecError(f"dataset {self.cell.dataset.get('name')!r}: the runner engine trains folder datasets; "
                            "use engine 'memory' (offline datasets) or 'mmengine' (mmseg configs)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.folder = folder_of(self.cell.dataset)
        self.classes = entry_classes(self.cell.dataset)
        self.baseline_mb = peak_rss_mb()  # before any Runner or model
        self._build()

    def _build(self):
        from promptmatch.engine import build_segmentor

        c = self.cell
        weights, remap, pretrained = weights_for(c.backbone)
        return build_segmentor(c.backbone["name"], c.method_name, len(self.classes), decoder=c.settings["decoder"],
                               class_names=self.classes, weights=weights, pretrained=pretrained, weights_remap=remap,
                               method_cfg=dict(c.method_cfg) or None, decoder_cfg=c.settings.get("decoder_cfg"),
                               backbone_kwargs=c.backbone.get("kwargs") or None,
                               num_stages=c.backbone.get("num_stages"), seed=c.seed)

    def _config(self, work_dir: Path, lr: float, val_split: str, train_indices: Optional[List[int]] = None,
                val_indices: Optional[List[int]] = None):
        from promptmatch.engine import FolderTrainConfig

        c, s, d = self.cell, self.cell.settings, self.cell.dataset
        weights, remap, pretrained = weights_for(c.backbone)
        wd = s.get("weight_decay")
        return FolderTrainConfig(
            folder=str(self.folder.root), classes=list(self.folder.classes), backbone=c.backbone["name"],
            out=str(work_dir), method=c.method_name, decoder=s["decoder"], weights=weights, pretrained=pretrained,
            weights_remap=remap, method_cfg=dict(c.method_cfg) or None, decoder_cfg=s.get("decoder_cfg"),
            backbone_kwargs=c.backbone.get("kwargs") or None, num_stages=c.backbone.get("num_stages"),
            reduce_zero_label=self.folder.reduce_zero_label, img_suffix=self.folder.img_suffix,
            seg_map_suffix=self.folder.seg_map_suffix, train_split=d.get("train_split", "train"),
            val_split=val_split, train_indices=train_indices, val_indices=val_indices, steps=int(s["steps"]),
            batch=int(s["batch"]), lr=float(lr), weight_decay=RUNNER_WEIGHT_DECAY if wd is None else float(wd),
            crop=int(s.get("image_size") or 512), amp=s.get("amp"), seed=int(c.seed), workers=int(s.get("workers", 2)),
            eval_mode=s.get("eval_mode", "whole"), eval_crop=s.get("eval_crop"), eval_stride=s.get("eval_stride"),
            max_bad_steps=int(c.max_bad_steps), launcher=self.launcher, progress=False, check_data=False,
            device=self.device.type,  # the cell's device, also where mmengine would take a visible GPU
            checkpoint_interval=int(s["steps"]), keep_checkpoints=1, save_merged=False, log_level="WARNING",
            extra={"dataset": d["name"], "lr": float(lr)})

    def trial(self, lr: float) -> float:
        """Held-out mIoU of training at ``lr`` on the training split minus its held-out part."""
        from promptmatch.datasets.folder import folder_pairs
        from promptmatch.engine import train_folder
        from promptmatch.training import holdout_split

        train_split = self.cell.dataset.get("train_split", "train")
        idx = getattr(self, "_trial_idx", None)
        if idx is None:
            n = len(folder_pairs(self.folder, train_split))
            idx = self._trial_idx = holdout_split(n, self.cell.settings["holdout"], seed=0)
        n_trial = self._n_trials = getattr(self, "_n_trials", -1) + 1
        cfg = self._config(self.work_dir / f"lr_{n_trial}", lr, train_split, idx[0], idx[1])
        return float(train_folder(cfg, save=False)["val_miou"])

    def final(self, lr: float) -> Dict[str, Any]:
        """Train on the whole training split at ``lr``; evaluate every split and target; measure."""
        import torch

        from promptmatch import parameter_report
        from promptmatch.engine import train_folder

        s = self.cell.settings
        out: Dict[str, Any] = {"config_file": str(self.work_dir / "train_config.json"), "work_dir": str(self.work_dir)}
        self.partial = out  # what a diverged record keeps
        probe = self._build()
        rep = parameter_report(probe)
        out.update(method_config=probe.method.config.to_dict(), trainable_params=rep.trainable,
                   backbone_params=rep.backbone_total, trainable_pct=rep.percent_of_backbone(rep.trainable),
                   parameters=rep.as_dict())
        del probe
        sets = eval_sets(self.cell)
        reset_cuda_peak(self.device)
        res = train_folder(self._config(self.work_dir, lr, sets[0][2]))
        seg = res["segmentor"]
        ran_on = next(seg.parameters()).device
        if ran_on.type != self.device.type:  # the record must name where the model really ran
            raise RuntimeError(f"the cell asked for {self.device.type} but mmengine's Runner put the model on {ran_on}")
        self.device = ran_on
        out.update(peak_memory_fields(self.device, self.baseline_mb, step_peak_bytes=res.get("step_peak_bytes")))
        out["eval_precision"] = eval_precision(s)
        times, losses, world = res["times"], res["losses"], _world_size()
        step_s = step_time_median(times, s["warmup"])
        out.update(step_time_median_s=step_s, throughput_img_s=world * s["batch"] / step_s, train_s=float(sum(times)),
                   train_wall_s=res["train_wall_s"],
                   throughput_e2e_img_s=world * s["batch"] * len(times) / res["train_wall_s"],
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None, lr_used=lr,
                   skipped_steps=res["skipped_steps"])
        out["miou"], out["per_class_iou"] = {}, {}
        for key, entry, split in sets:
            classes = self.classes if entry is self.cell.dataset else entry_classes(entry)
            metrics = res["metrics"] if key == sets[0][0] else self._evaluate(seg, entry, split)
            out["miou"][key] = float(metrics["mIoU"])
            out["per_class_iou"][key] = {n: _nan_to_none(metrics.get(f"IoU.{n}")) for n in classes}
        out["latency_ms_median"] = self._latency(seg)
        ckpt = self.work_dir / "prompts.safetensors"
        if ckpt.is_file():
            out.update(checkpoint=str(ckpt), checkpoint_bytes=ckpt.stat().st_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    def _eval_options(self) -> Dict[str, Any]:
        return self._config(self.work_dir, RUNNER_LR, "val").eval_options()

    def _evaluate(self, seg: Any, entry: Mapping[str, Any], split: str) -> Dict[str, float]:
        """Metrics of a split: a folder's through the engine's evaluation; another source's
        (e.g. an offline target) on its in-memory tensors at the setting's image size."""
        from promptmatch.datasets.folder import describe_folder_dataset
        from promptmatch.engine import evaluate_folder

        if entry_source(entry).name == "folder":
            fd = folder_of(entry)
            fd = describe_folder_dataset(fd.root, classes=list(fd.classes), splits=(split,), img_suffix=fd.img_suffix,
                                         seg_map_suffix=fd.seg_map_suffix, reduce_zero_label=fd.reduce_zero_label)
            return evaluate_folder(seg, fd, split, device=self.device, **self._eval_options())
        from promptmatch.engine import iou_from_areas
        from promptmatch.training import confusion_matrix, evaluate_segmentor

        s = self.cell.settings
        x, y = memory_tensors(entry, split, s.get("image_size"), getattr(seg, "input_normalisation", None))
        ev = self._eval_options()
        k = len(entry_classes(entry))
        _, _, preds = evaluate_segmentor(seg, x, y, k, batch=s["eval_batch"], device=self.device,
                                         mode=ev["eval_mode"], crop=ev["eval_crop"], stride=ev["eval_stride"],
                                         amp=ev["amp"])
        conf = confusion_matrix(preds.flatten(), y.flatten(), k)
        return iou_from_areas(conf.diag().numpy(), conf.sum(0).numpy(), conf.sum(1).numpy(), entry_classes(entry))

    def _latency(self, seg: Any) -> float:
        """Median ms of predicting one validation image (the evaluation's resize and mode)."""
        from promptmatch.engine import FolderSegDataset, SegmentorModel

        s, ev = self.cell.settings, self._eval_options()
        split = self.cell.dataset["splits"][0]
        ds = FolderSegDataset(self.folder, split, eval_scale=ev["eval_scale"])
        model = SegmentorModel(seg, eval_mode=ev["eval_mode"], eval_crop=tuple(ev["eval_crop"]),
                               eval_stride=tuple(ev["eval_stride"]), amp=ev["amp"])
        n = int(s["latency_images"]) + 2  # two warm-up calls
        items = [ds[i % len(ds)]["inputs"].to(self.device) for i in range(n)]
        return latency_ms(lambda x: model.predict_maps([x]), items, self.device)
