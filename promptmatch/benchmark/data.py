"""The datasets of a benchmark spec: their classes, the in-memory tensors of the small ones,
mmseg configs that reference them, and the checks run before any training.

Each entry is handled by its registered :class:`~promptmatch.benchmark.sources.DataSource`
(``offline``, ``folder``, ``mmseg_config``, or one registered by the user; see
``configs/benchmark/README.md`` and ``docs/datasets.md``); the functions here call it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .errors import SpecError
from .sources import DataSource, folder_of, get_source, load_config_ref
from .spec import BenchmarkSpec

__all__ = ["DataProblemsError", "problems_text", "entry_classes", "entry_source", "folder_of", "memory_tensors",
           "load_config_ref", "mmseg_dataset_config", "check_spec_data", "train_count"]

_logger = logging.getLogger(__name__)


class DataProblemsError(SpecError):
    """A spec's datasets are missing or malformed, or its settings do not resolve against the
    data, the machine or the installed packages; ``problems`` lists every one found (the data's
    first, then the settings')."""

    def __init__(self, problems: List[str], setting_problems: Sequence[str] = ()):
        self.problems = list(problems) + list(setting_problems)
        self._parts = (list(problems), list(setting_problems))
        super().__init__(problems_text(problems, setting_problems) + ", nothing was trained:" + "".join(
            "\n  - " + p.replace("\n", "\n    ") for p in self.problems))

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), self._parts)


def problems_text(data: Sequence[str], settings: Sequence[str]) -> str:
    """``N data problem(s)``, ``M problem(s) with the settings, ...`` or both, joined by "and"."""
    parts = [f"{len(data)} data problem(s)"] if data else []
    if settings:
        parts.append(f"{len(settings)} problem(s) with the settings, this machine or the installed packages")
    return " and ".join(parts) or "no problems"


def entry_source(entry: Mapping[str, Any]) -> DataSource:
    """The registered source of a dataset entry."""
    return get_source(entry.get("source", "offline"))


def entry_classes(entry: Mapping[str, Any]) -> List[str]:
    """Class names of a dataset entry."""
    return entry_source(entry).classes(entry)


def memory_tensors(entry: Mapping[str, Any], split: str, size: Optional[int],
                   normalisation: Optional[Tuple[Any, Any]] = None) -> Tuple[Any, Any]:
    """``(images, labels)`` of one split as tensors (float NCHW normalised with ``normalisation``,
    ``(mean, std)`` on the 0..1 scale, default ImageNet's; int64 NHW), resized to ``size`` x
    ``size`` when given; for the in-memory engine (small data only)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    imgs, labels = entry_source(entry).arrays(entry, split, size)
    stats = normalisation or (IMAGENET_MEAN, IMAGENET_STD)
    mean = torch.tensor(stats[0], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float().div_(255) - mean) / std
    y = torch.from_numpy(labels.astype(np.int64))
    if size and (x.shape[-2], x.shape[-1]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return x, y


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
    return entry_source(entry).mmseg_dataset(entry, split, train_pipe if train else test_pipe, train, crop,
                                             indices, explicit_size)


def train_count(entry: Mapping[str, Any]) -> int:
    """Number of samples in an entry's training split."""
    return entry_source(entry).train_count(entry)


def check_spec_data(spec: BenchmarkSpec, deep: bool = True, progress: bool = False) -> List[str]:
    """Every problem with the spec's datasets, before any training: missing folders and data
    roots, and with ``deep`` every bad-data case of a folder (an image without a mask or the
    reverse, sizes, label values, unreadable files, empty splits); also an ``eval_on`` target
    whose classes differ from its source's. Returns ``[]`` when all is well."""
    problems: List[str] = []
    classes: Dict[str, Optional[List[str]]] = {}
    for d in spec.datasets:
        try:
            found, classes[d["name"]] = entry_source(d).problems(d, deep, progress)
            problems.extend(found)
        except SpecError as e:  # a source says what is wrong by raising; collect it with the rest
            problems.append(str(e))
            classes[d["name"]] = None
        except ImportError as e:  # e.g. an mmseg_config dataset without the mmseg stack
            problems.append(f"dataset {d['name']!r} (source {d.get('source', 'offline')}) cannot be read: {e}")
            classes[d["name"]] = None
    sweeps = [st["holdout"] for st in spec.settings if isinstance(st.get("lr"), Mapping)]
    for d in spec.datasets:  # a training split with samples (and, for an lr sweep, one it can split)
        always = entry_source(d).count_train_always
        if d.get("eval_only") or classes.get(d["name"]) is None or not (sweeps or always):
            continue
        if always and any(f"dataset {d['name']!r}" in p for p in problems):
            continue  # its data is missing: said above
        try:
            n = train_count(d)
        except Exception as e:  # any failure to read is a problem to list, not a crash
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
