"""``mmseg_config``: any dataset mmseg knows, through one of its dataset configs (with the
config's own pipelines)."""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import SpecError
from .base import DataSource, DatasetEntry, register_source, subset_config

__all__ = ["MmsegConfigEntry", "MmsegConfigSource", "config_ref", "load_config_ref"]

_REPEAT = ("RepeatDataset", "mmengine.RepeatDataset")


def config_ref(ref: Any, where: str) -> str:
    """An mmseg config reference: ``mmseg::...`` as given, a local path made absolute."""
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"{where} must be a config path or 'mmseg::<path in mmseg's configs>', got {ref!r}")
    if ref.startswith("mmseg::"):
        return ref
    if not Path(ref).is_file():
        raise SpecError(f"{where}: config {ref!r} does not exist (a path relative to the current directory, "
                        f"{os.getcwd()}, or 'mmseg::_base_/datasets/ade20k.py' for a config mmseg ships)")
    return str(Path(ref).resolve())


def load_config_ref(ref: str):
    """An mmengine ``Config`` from a path or ``mmseg::<path in mmseg's configs>``."""
    from mmengine.config import Config

    if not ref.startswith("mmseg::"):
        return Config.fromfile(ref)
    with tempfile.TemporaryDirectory(prefix="pm-cfg-") as tmp:  # mmseg:: works through _base_ only
        p = Path(tmp) / "ref.py"
        p.write_text(f"_base_ = [{ref!r}]\n")
        return Config.fromfile(str(p))


@dataclass
class MmsegConfigEntry(DatasetEntry):
    """An mmseg dataset config (a path, or ``mmseg::<path in mmseg's configs>``) and an
    optional ``data_root`` replacing the config's; evaluated on the config's val_dataloader,
    so ``splits`` is ``["val"]``."""

    mmseg_config: Any = None
    data_root: Any = None

    def __post_init__(self, where: str) -> None:
        self.mmseg_config = config_ref(self.mmseg_config, f"{where}: mmseg_config")
        if self.data_root is not None:
            self.data_root = str(Path(self.data_root).expanduser().resolve())
        super().__post_init__(where)

    def check_splits(self, splits: List[str], where: str) -> None:
        if splits != ["val"]:
            raise SpecError(f"{where}: an mmseg_config dataset is evaluated on its config's val_dataloader: "
                            f"splits must be ['val'], got {splits!r}")


def _plain(cfg: Any) -> Any:
    """A deep copy of a config value as plain dicts and lists."""
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


def _config_crop(full: Any) -> Optional[Tuple[int, int]]:
    """The config's crop size: its top-level ``crop_size``, else its training RandomCrop's."""
    c = full.get("crop_size")
    if c is None:
        for leaf in _leaves(_plain(full.get("train_dataloader", {}).get("dataset", {}))):
            for t in leaf.get("pipeline") or []:
                if "crop_size" in t:
                    c = t["crop_size"]
                    break
            if c is not None:
                break
    return (c, c) if isinstance(c, int) else c


@register_source
class MmsegConfigSource(DataSource):
    """mmseg dataset configs: mmengine engine only; their data roots are checked before training."""

    name = "mmseg_config"
    entry_class = MmsegConfigEntry
    in_memory = False
    count_train_always = True

    def classes(self, entry: Mapping[str, Any]) -> List[str]:
        import promptmatch.mmseg  # noqa: F401  (registers promptmatch's types)
        from mmseg.registry import DATASETS

        cfg = load_config_ref(entry["mmseg_config"])
        loader = cfg.get("val_dataloader") or cfg.get("test_dataloader") or cfg.get("train_dataloader")
        if not loader:
            raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has no dataloader to read the "
                            "dataset from (train_dataloader / val_dataloader / test_dataloader)")
        ds = _leaves(_plain(loader["dataset"]))[0]
        meta = dict(ds.get("metainfo") or {})
        if "classes" in meta:
            return list(meta["classes"])
        cls = DATASETS.get(str(ds["type"]).split(".")[-1]) or DATASETS.get(ds["type"])
        if cls is None:
            raise SpecError(f"dataset {entry['name']!r}: mmseg does not know the dataset type {ds['type']!r}")
        return list(cls.METAINFO["classes"])

    def problems(self, entry: Mapping[str, Any], deep: bool, progress: bool
                 ) -> Tuple[List[str], Optional[List[str]]]:
        from promptmatch.mmseg.runtime import _DATASET_HELP

        problems: List[str] = []
        missing: Dict[str, List[str]] = {}
        for split in (["val"] if entry.get("eval_only") else ["train", "val"]):
            ds, _ = self.mmseg_dataset(entry, split, [], split == "train", (512, 512), None, False)
            dtype = str(ds.get("type", "?")).split(".")[-1]
            for root in _data_roots(ds):
                if not os.path.isdir(root):
                    missing.setdefault(root, []).append(split)
        for root, splits in missing.items():
            splits = list(dict.fromkeys(splits))
            name, layout, where = _DATASET_HELP.get(dtype, (dtype, "see mmseg's dataset_prepare.md", "-"))
            problems.append(
                f"dataset {entry['name']!r} ({'/'.join(splits)}): data_root {root} does not exist"
                f"{'' if os.path.isabs(root) else f' (relative to {os.getcwd()})'}; {name} is expected "
                f"there as {layout}; get it from {where}; or give the entry a \"data_root\"")
        try:
            return problems, self.classes(entry)
        except SpecError as e:  # listed after the missing data roots found above
            return problems + [str(e)], None

    def train_count(self, entry: Mapping[str, Any]) -> int:
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

        ds, _ = self.mmseg_dataset(entry, "train", [], False, (512, 512), None, False)
        while ds.get("type") in _REPEAT and "dataset" in ds:
            ds = ds["dataset"]  # the samples, not their repeats
        with DefaultScope.overwrite_default_scope("mmseg"):
            return len(DATASETS.build(bare(ds)))

    def mmseg_dataset(self, entry: Mapping[str, Any], split: str, pipeline: List[Dict[str, Any]], train: bool,
                      crop: Tuple[int, int], indices: Optional[List[int]], explicit_size: bool
                      ) -> Tuple[Dict[str, Any], Optional[Tuple[int, int]]]:
        """The config's own dataset of ``split`` (``train`` or ``val``) with its own pipeline
        (``pipeline`` is not used); the held-out part of the training split (``train`` False)
        gets the val pipeline; ``explicit_size`` replaces the config's crop size by ``crop``
        and scales its resizes with it."""
        full = load_config_ref(entry["mmseg_config"])
        val_loader = full.get("val_dataloader") or full.get("test_dataloader")
        if split != "train" and not val_loader:
            raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has neither a val_dataloader nor "
                            "a test_dataloader to evaluate on")
        loader = full.get("train_dataloader") if split == "train" else val_loader
        if not loader:
            raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has no train_dataloader")
        ds = _plain(loader["dataset"])
        if indices is not None:  # a part of the split: of the datasets a RepeatDataset repeats, not of the repeats
            while ds.get("type") in _REPEAT and "dataset" in ds:
                ds = ds["dataset"]
        val_pipe = _plain(_leaves(val_loader["dataset"])[0].get("pipeline")) if val_loader else None
        if not train and split == "train":  # held-out part of the training split: the val pipeline
            if val_pipe is None:
                raise SpecError(f"dataset {entry['name']!r}: {entry['mmseg_config']} has no val pipeline for the "
                                "held-out part of the training split")
            for leaf in _leaves(ds):
                leaf["pipeline"] = list(val_pipe)
        c = _config_crop(full)
        if explicit_size and tuple(crop) != (tuple(c) if c is not None else None):  # the setting's size
            if c is None:
                raise SpecError(f"dataset {entry['name']!r}: image_size {crop[0]} cannot be applied to "
                                f"{entry['mmseg_config']}: its pipeline names no crop size; set image_size null")
            for leaf in _leaves(ds):
                leaf["pipeline"] = [_rescale_transform(t, tuple(c), crop) for t in leaf.get("pipeline") or []]
            c = crop
        if entry.get("data_root"):
            _set_data_root(ds, entry["data_root"])
        return subset_config(ds, indices), (tuple(c) if c is not None else None)
