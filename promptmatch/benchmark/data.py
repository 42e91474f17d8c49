"""The datasets of a benchmark spec: their classes, the in-memory tensors of the small ones,
mmseg configs that reference them, and the checks run before any training.

Three kinds of dataset entry (see ``configs/benchmark/README.md``): a promptmatch offline
dataset by name, a user's ``folder`` in mmseg's layout, and an ``mmseg_config`` (any dataset
mmseg knows, with its own pipelines).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .spec import BenchmarkSpec, SpecError

__all__ = ["DataProblemsError", "entry_classes", "folder_of", "memory_tensors", "load_config_ref",
           "mmseg_dataset_config", "check_spec_data", "train_count"]

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataProblemsError(SpecError):
    """A spec's datasets are missing or malformed; ``problems`` lists every one found."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} data problem(s), nothing was trained:\n  - "
                         + "\n  - ".join(p.replace("\n", "\n    ") for p in self.problems))


def folder_of(entry: Mapping[str, Any]):
    """The :class:`~promptmatch.datasets.FolderDataset` of a ``folder`` entry."""
    from promptmatch.datasets.folder import describe_folder_dataset

    train = [] if entry.get("eval_only") else [entry.get("train_split", "train")]  # eval-only: no train split
    splits = tuple(dict.fromkeys([*train, *entry.get("splits", ["val"])]))
    return describe_folder_dataset(entry["folder"], classes=entry.get("classes"), splits=splits,
                                   img_suffix=entry.get("img_suffix"),
                                   seg_map_suffix=entry.get("seg_map_suffix", ".png"),
                                   reduce_zero_label=bool(entry.get("reduce_zero_label", False)),
                                   palette=entry.get("palette"))


def load_config_ref(ref: str):
    """An mmengine ``Config`` from a path or ``mmseg::<path in mmseg's configs>``."""
    from mmengine.config import Config

    if not ref.startswith("mmseg::"):
        return Config.fromfile(ref)
    with tempfile.TemporaryDirectory(prefix="pm-cfg-") as tmp:  # mmseg:: works through _base_ only
        p = Path(tmp) / "ref.py"
        p.write_text(f"_base_ = [{ref!r}]\n")
        return Config.fromfile(str(p))


def _mmseg_classes(entry: Mapping[str, Any]) -> List[str]:
    import promptmatch.mmseg  # noqa: F401  (registers promptmatch's types)
    from mmseg.registry import DATASETS

    cfg = load_config_ref(entry["mmseg_config"])
    loader = cfg.get("val_dataloader") or cfg.get("test_dataloader") or cfg.get("train_dataloader")
    if not loader:
        raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has no dataloader to read the dataset "
                        "from (train_dataloader / val_dataloader / test_dataloader)")
    ds = _leaves(_plain(loader["dataset"]))[0]
    meta = dict(ds.get("metainfo") or {})
    if "classes" in meta:
        return list(meta["classes"])
    cls = DATASETS.get(str(ds["type"]).split(".")[-1]) or DATASETS.get(ds["type"])
    if cls is None:
        raise SpecError(f"dataset {entry['name']!r}: mmseg does not know the dataset type {ds['type']!r}")
    return list(cls.METAINFO["classes"])


def entry_classes(entry: Mapping[str, Any]) -> List[str]:
    """Class names of a dataset entry (offline, folder or mmseg_config)."""
    source = entry.get("source", "offline")
    if source == "offline":
        from promptmatch import datasets as pmdata

        return list(pmdata.dataset_classes(entry["name"]))
    if source == "folder":
        return list(folder_of(entry).classes)
    return _mmseg_classes(entry)


def memory_tensors(entry: Mapping[str, Any], split: str, size: Optional[int]) -> Tuple[Any, Any]:
    """``(images, labels)`` of one split as tensors (normalised float NCHW, int64 NHW),
    resized to ``size`` x ``size`` when given; for the in-memory engine (small data only)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from promptmatch import datasets as pmdata

    if entry.get("source", "offline") == "offline":
        imgs, labels = pmdata.load_offline_split(pmdata.build_offline_dataset(entry["name"]), split)
    elif entry["source"] == "folder":
        from promptmatch.datasets.folder import load_folder_split

        imgs, labels = load_folder_split(folder_of(entry), split, size)
    else:
        raise SpecError(f"dataset {entry['name']!r}: the memory engine cannot load an mmseg_config dataset")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float().div_(255) - mean) / std
    y = torch.from_numpy(labels.astype(np.int64))
    if size and (x.shape[-2], x.shape[-1]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return x, y


def _folder_dataset_cfg(entry: Mapping[str, Any], split: str, pipeline: List[Dict[str, Any]],
                        indices: Optional[List[int]] = None) -> Dict[str, Any]:
    fd = folder_of(entry)
    meta: Dict[str, Any] = {"classes": tuple(fd.classes)}
    if fd.palette:
        meta["palette"] = [list(p) for p in fd.palette]
    cfg: Dict[str, Any] = dict(type="BaseSegDataset", data_root=str(fd.root),
                               data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"),
                               metainfo=meta, seg_map_suffix=fd.seg_map_suffix,
                               reduce_zero_label=fd.reduce_zero_label, pipeline=pipeline)
    suffix = fd.img_suffix
    if suffix is None:  # any of .png/.jpg/.jpeg: mmseg takes one suffix, so use the one present
        from promptmatch.datasets.folder import folder_pairs

        pairs = folder_pairs(fd, split)
        suffix = pairs[0][0].suffix if pairs else ".png"
        if len({p.suffix for p, _ in pairs}) > 1:
            raise SpecError(f"dataset {entry['name']!r}: the images of split {split!r} mix suffixes "
                            f"{sorted({p.suffix for p, _ in pairs})}; mmseg reads one: give 'img_suffix'")
    cfg["img_suffix"] = suffix
    return _subset(cfg, indices)


def mmseg_dataset_config(entry: Mapping[str, Any], split: str, train: bool, crop: Tuple[int, int],
                         indices: Optional[List[int]] = None, explicit_size: bool = False
                         ) -> Tuple[Dict[str, Any], Optional[Tuple[int, int]]]:
    """An mmseg dataset config of one split of an entry, with its pipeline: mmseg's own for an
    ``mmseg_config`` entry (``split`` 'train' or 'val'), else the benchmarking recipe's (random
    resize 0.5-2.0, crop, flip, photometric distortion; test: resize the short side to the
    crop). Returns it with the config's crop size where it names one; ``explicit_size`` (a
    setting's ``image_size``) replaces that crop size, and scales the config's resizes with it."""
    scale = (4 * crop[1], crop[0])
    train_pipe = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
                  dict(type="RandomResize", scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
                  dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75), dict(type="RandomFlip", prob=0.5),
                  dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")]
    test_pipe = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True),
                 dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    source = entry.get("source", "offline")
    if source == "folder":
        return _folder_dataset_cfg(entry, split, train_pipe if train else test_pipe, indices), None
    if source == "offline":
        cfg = dict(type="promptmatch.OfflineSegDataset", name=entry["name"], split=split,
                   pipeline=train_pipe if train else test_pipe)
        return _subset(cfg, indices), None
    full = load_config_ref(entry["mmseg_config"])
    val_loader = full.get("val_dataloader") or full.get("test_dataloader")
    if split != "train" and not val_loader:
        raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has neither a val_dataloader nor a "
                        "test_dataloader to evaluate on")
    loader = full.get("train_dataloader") if split == "train" else val_loader
    if not loader:
        raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has no train_dataloader")
    ds = _plain(loader["dataset"])
    if indices is not None:  # a part of the split: of the datasets a RepeatDataset repeats, not of the repeats
        while ds.get("type") in ("RepeatDataset", "mmengine.RepeatDataset") and "dataset" in ds:
            ds = ds["dataset"]
    val_pipe = _plain(_leaves(val_loader["dataset"])[0].get("pipeline")) if val_loader else None
    if not train and split == "train":  # held-out part of the training split: the val pipeline
        if val_pipe is None:
            raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has no val pipeline for the "
                            "held-out part of the training split")
        for leaf in _leaves(ds):
            leaf["pipeline"] = list(val_pipe)
    c = full.get("crop_size")
    if c is None:  # no top-level crop_size: the training pipeline's RandomCrop
        for leaf in _leaves(_plain(full.get("train_dataloader", {}).get("dataset", {}))):
            for t in leaf.get("pipeline") or []:
                if "crop_size" in t:
                    c = t["crop_size"]
                    break
            if c is not None:
                break
    c = (c, c) if isinstance(c, int) else c
    if explicit_size and tuple(crop) != (tuple(c) if c is not None else None):  # the setting's size
        if c is None:
            raise SpecError(f"dataset {entry['name']!r}: image_size {crop[0]} cannot be applied to "
                            f"{entry['mmseg_config']}: its pipeline names no crop size; set image_size null")
        for leaf in _leaves(ds):
            leaf["pipeline"] = [_rescale_transform(t, tuple(c), crop) for t in leaf.get("pipeline") or []]
        c = crop
    if entry.get("data_root"):
        _set_data_root(ds, entry["data_root"])
    return _subset(ds, indices), (tuple(c) if c is not None else None)


def _plain(cfg: Any) -> Any:
    """A deep copy of a config value as plain dicts and lists."""
    import copy

    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return copy.deepcopy(cfg)


def _leaves(cfg: Any) -> List[Dict[str, Any]]:
    """The datasets a dataset config holds (itself, or those its wrappers hold), in order."""
    if isinstance(cfg, (list, tuple)):
        return [leaf for c in cfg for leaf in _leaves(c)]
    if isinstance(cfg, Mapping):
        if "datasets" in cfg:
            return _leaves(cfg["datasets"])
        if "dataset" in cfg:
            return _leaves(cfg["dataset"])
        return [cfg]  # type: ignore[list-item]
    return []


def _subset(cfg: Dict[str, Any], indices: Optional[List[int]]) -> Dict[str, Any]:
    if indices is None:
        return cfg
    return dict(type="promptmatch.SubsetDataset", dataset=cfg, indices=list(indices))


def _set_data_root(cfg: Any, root: str) -> None:
    """Replace the data_root of a dataset config and of the datasets a wrapper holds."""
    if isinstance(cfg, (list, tuple)):
        for c in cfg:
            _set_data_root(c, root)
    elif isinstance(cfg, Mapping):
        if "data_root" in cfg or not ("dataset" in cfg or "datasets" in cfg):
            cfg["data_root"] = root  # type: ignore[index]
        for k in ("dataset", "datasets"):
            if k in cfg:
                _set_data_root(cfg[k], root)


def _rescale_transform(t: Mapping[str, Any], old: Tuple[int, int], new: Tuple[int, int]) -> Dict[str, Any]:
    """A pipeline step with its crop size replaced and its resize scale scaled by ``new / old``."""
    t = dict(t)
    f = new[0] / old[0]
    if "crop_size" in t:
        t["crop_size"] = tuple(new)
    if "scale" in t and isinstance(t["scale"], (list, tuple)):
        t["scale"] = tuple(max(1, round(v * f)) for v in t["scale"])
    if t.get("type") == "Pad" and isinstance(t.get("size"), (list, tuple)):
        t["size"] = tuple(new)
    if "scales" in t and isinstance(t["scales"], (list, tuple)):  # RandomChoiceResize
        t["scales"] = [tuple(max(1, round(v * f)) for v in sc) if isinstance(sc, (list, tuple))
                       else max(1, round(sc * f)) for sc in t["scales"]]
    return t


def _data_roots(cfg: Mapping[str, Any]) -> List[str]:
    out, stack = [], [cfg]
    while stack:
        d = stack.pop()
        if isinstance(d, Mapping):
            if d.get("data_root"):
                out.append(str(d["data_root"]))
            stack.extend(v for k, v in d.items() if k in ("dataset", "datasets"))
        elif isinstance(d, (list, tuple)):
            stack.extend(d)
    return out


def train_count(entry: Mapping[str, Any]) -> int:
    """Number of samples in an entry's training split."""
    source = entry.get("source", "offline")
    if source == "offline":
        from promptmatch import datasets as pmdata

        return int(pmdata.OFFLINE_DATASETS[entry["name"]].num_train)
    if source == "folder":
        from promptmatch.datasets.folder import folder_pairs

        return len(folder_pairs(folder_of(entry), entry.get("train_split", "train")))
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS

    def bare(c: Any) -> Any:  # no pipelines: counting samples decodes nothing
        if isinstance(c, list):
            return [bare(x) for x in c]
        if not isinstance(c, Mapping):
            return c
        c = {k: bare(v) if k in ("dataset", "datasets") else v for k, v in c.items()}
        if "pipeline" in c:
            c["pipeline"] = []
        return c

    ds, _ = mmseg_dataset_config(entry, "train", False, (512, 512))
    while ds.get("type") in ("RepeatDataset", "mmengine.RepeatDataset") and "dataset" in ds:
        ds = ds["dataset"]  # the samples, not their repeats
    with DefaultScope.overwrite_default_scope("mmseg"):
        return len(DATASETS.build(bare(ds)))


def check_spec_data(spec: BenchmarkSpec, deep: bool = True, progress: bool = False) -> List[str]:
    """Every problem with the spec's datasets, before any training: missing folders and data
    roots, and with ``deep`` every bad-data case of a folder (an image without a mask or the
    reverse, sizes, label values, unreadable files, empty splits); also an ``eval_on`` target
    whose classes differ from its source's. Returns ``[]`` when all is well."""
    problems: List[str] = []
    classes: Dict[str, Optional[List[str]]] = {}
    for d in spec.datasets:
        src = d.get("source", "offline")
        try:
            if src == "folder":
                from promptmatch.datasets.folder import FolderDatasetError, check_folder_dataset

                try:
                    fd = folder_of(d)
                    if deep:
                        check_folder_dataset(fd, check_labels=True, progress=progress)
                    elif not fd.root.is_dir():
                        problems.append(f"dataset {d['name']!r}: folder {fd.root} does not exist")
                    classes[d["name"]] = list(fd.classes)
                except FolderDatasetError as e:
                    problems.append(f"dataset {d['name']!r}: {e}")
                    classes[d["name"]] = None
            elif src == "mmseg_config":
                from promptmatch.mmseg.runtime import _DATASET_HELP

                missing: Dict[str, List[str]] = {}
                for split in (["val"] if d.get("eval_only") else ["train", "val"]):
                    ds, _ = mmseg_dataset_config(d, split, train=split == "train", crop=(512, 512))
                    dtype = str(ds.get("type", "?")).split(".")[-1]
                    for root in _data_roots(ds):
                        if not os.path.isdir(root):
                            missing.setdefault(root, []).append(split)
                for root, splits in missing.items():
                    splits = list(dict.fromkeys(splits))
                    name, layout, where = _DATASET_HELP.get(dtype, (dtype, "see mmseg's dataset_prepare.md", "-"))
                    problems.append(
                        f"dataset {d['name']!r} ({'/'.join(splits)}): data_root {root} does not exist"
                        f"{'' if os.path.isabs(root) else f' (relative to {os.getcwd()})'}; {name} is expected "
                        f"there as {layout}; get it from {where}; or give the entry a \"data_root\"")
                classes[d["name"]] = _mmseg_classes(d)
            else:
                classes[d["name"]] = entry_classes(d)
        except SpecError as e:
            problems.append(str(e))
            classes[d["name"]] = None
    sweeps = [st["holdout"] for st in spec.settings if isinstance(st.get("lr"), Mapping)]
    for d in spec.datasets:  # a training split with samples (and, for an lr sweep, one it can split)
        if d.get("eval_only") or classes.get(d["name"]) is None or not (sweeps or d["source"] == "mmseg_config"):
            continue
        if d["source"] == "mmseg_config" and any(f"dataset {d['name']!r}" in p for p in problems):
            continue  # its data root is missing: said above
        try:
            n = train_count(d)
        except Exception as e:
            problems.append(f"dataset {d['name']!r}: its training split cannot be read: {type(e).__name__}: {e}")
            continue
        if n == 0:
            problems.append(f"dataset {d['name']!r}: its training split holds no samples (check the data_root and "
                            "the config's data_prefix / ann_file)")
            continue
        for frac in sorted(set(sweeps)):  # (none without an lr sweep)
            k = round(frac * n)
            if not 1 <= k <= n - 1:
                problems.append(f"dataset {d['name']!r}: an lr sweep holds out {frac:g} of the training split, but "
                                f"its {n} sample(s) leave {k} held out and {n - k} to train on; both need at "
                                "least one: add training data or change the setting 'holdout'")
    for d in spec.datasets:
        for t in d.get("eval_on", []):
            a, b = classes.get(d["name"]), classes.get(t)
            if a is not None and b is not None and len(a) != len(b):
                problems.append(f"dataset {d['name']!r} is evaluated on {t!r} (eval_on), but they have "
                                f"{len(a)} and {len(b)} classes; a domain-shift pair needs the same classes")
    # dedupe, keep order
    return list(dict.fromkeys(problems))
