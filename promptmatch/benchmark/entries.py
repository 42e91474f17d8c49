"""Typed entries of a benchmark spec, each checked where it is built: methods
(:class:`MethodEntry`), backbones (:class:`BackboneEntry`) and settings
(:func:`check_setting`). Dataset entries are typed by their source
(:mod:`promptmatch.benchmark.sources`)."""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import SpecError
from .sources import config_ref
from .sources.base import as_list

__all__ = ["MethodEntry", "BackboneEntry", "SETTING_DEFAULTS", "NEW_SETTINGS", "EXCLUDE_FIELDS", "check_setting",
           "check_exclude", "excluded_by"]

#: The fields an ``exclude`` rule can match besides the settings' keys.
EXCLUDE_FIELDS = ("dataset", "backbone", "method", "seed")

#: Settings of a cell and their defaults; a spec's ``settings`` may give a list for any of
#: them (the grid takes their product) or a list of such mappings.
SETTING_DEFAULTS: Dict[str, Any] = {
    "decoder": "linear",
    "decoder_cfg": None,  # keyword arguments of the decoder, e.g. {"embed_dim": 64}
    "image_size": None,  # None: the dataset's own size (memory) / 512 crops (mmengine, runner); else the size
    "steps": 100,
    "batch": 8,
    "lr": None,  # a number; a per-method sweep {"default": [..], "<method>": [..]}; None: the engine's default
    "warmup": 5,  # steps left out of the step-time median
    "eval_batch": 16,
    "latency_images": 8,
    # added with the real-data benchmark; a cell key leaves them out while they hold these
    # defaults, so results recorded before stay valid
    # "memory" (in-process loop), "runner" (promptmatch's folder engine on mmengine's Runner, no
    # mmcv) or "mmengine" (mmseg's pipeline on mmengine's Runner); None: by dataset
    "engine": None,
    "weight_decay": None,  # None: 0.01 (memory) / 0.05 (runner, mmengine: the benchmarking recipe)
    "eval_mode": "whole",  # or "slide" (sliding-window inference with eval_crop / eval_stride)
    "eval_crop": None,
    "eval_stride": None,
    "amp": None,  # "bf16" (any device) or "fp16" (CUDA)
    "channels_last": False,
    "compile": False,
    "holdout": 0.2,  # fraction of the training split held out to choose a learning rate (lr sweeps)
    # extra lrs a sweep may try beyond each end of its list while the best is at that end (one
    # step of the list's ratio at that end each); never part of a cell key: a finished cell
    # whose sweep lacks a trial this asks for is run again, reusing its trials (cell.sweep_pending)
    "lr_extend": 0,
    "workers": 2,  # DataLoader workers (runner and mmengine engines)
}
#: settings added after the first records: left out of a cell key while at their defaults
NEW_SETTINGS = ("engine", "weight_decay", "eval_mode", "eval_crop", "eval_stride", "amp", "channels_last",
                "compile", "holdout", "workers")
_INT_SETTINGS = ("steps", "batch", "warmup", "eval_batch", "latency_images", "workers")
_CHOICES = {"engine": (None, "memory", "runner", "mmengine"), "eval_mode": ("whole", "slide"), "amp": (None, "bf16", "fp16"),
            "channels_last": (False, True), "compile": (False, True)}


@dataclass
class MethodEntry:
    """A method of a spec: a registered method ``name`` (``promptmatch.list_methods()``),
    shown as ``label``, with config overrides ``cfg`` (a variant needs its own label)."""

    name: str
    label: Optional[str] = None
    cfg: Optional[Mapping[str, Any]] = None
    where: InitVar[str] = "spec"

    def __post_init__(self, where: str) -> None:
        from promptmatch.methods import get_method, list_methods

        available = list(list_methods())
        if self.name not in available:
            raise SpecError(f"{where}: unknown method(s) [{self.name!r}]; available: {', '.join(available)} "
                            "(or \"all\")")
        self.cfg = dict(self.cfg or {})
        self.label = str(self.label if self.label is not None else self.name)
        if self.cfg and self.label == self.name:
            raise SpecError(f"{where} ({self.name}) overrides its config, so it needs its own 'label' "
                            "(e.g. 'spm-no-recurrence')")
        try:
            get_method(self.name).config_class.from_dict(self.cfg)
        except (TypeError, ValueError) as err:  # the config's own check names the bad field
            raise SpecError(f"{where} ({self.label}): bad 'cfg' for {self.name}: {err}") from None

    @classmethod
    def from_spec(cls, raw: Any, where: str) -> "MethodEntry":
        """From a method name or a mapping with ``name`` and optional ``label`` and ``cfg``."""
        e = {"name": raw} if isinstance(raw, str) else raw
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str) or set(e) - {"name", "label", "cfg"}:
            raise SpecError(f"{where} must be a method name or a mapping with 'name' and optional "
                            f"'label' and 'cfg' (config overrides); got {e!r}")
        return cls(**e, where=where)


_BACKBONE_KEYS = ("name", "weights", "kwargs", "label", "num_stages", "methods", "mmseg_model")


@dataclass
class BackboneEntry:
    """A backbone of a spec: a timm model ``name`` with ``weights`` (None: random init, a file,
    ``pretrained`` or packaged weights) and model ``kwargs``; or, with ``mmseg_model`` (a
    config path or ``mmseg::...``), an mmseg model shown under ``name``. ``methods`` limits
    the spec's methods on it; ``label`` names it in reports."""

    name: str
    weights: Any = None
    kwargs: Any = None
    label: Any = None
    num_stages: Any = None
    methods: Any = None
    mmseg_model: Any = None
    given: Tuple[str, ...] = field(default=(), repr=False, compare=False)
    where: InitVar[str] = "spec"
    spec_methods: InitVar[Sequence[str]] = ()

    def __post_init__(self, where: str, spec_methods: Sequence[str]) -> None:
        if "methods" in self.given:
            only = [str(m) for m in as_list(self.methods)]
            bad = [m for m in only if m not in spec_methods]
            if bad or not only:
                raise SpecError(f"{where}: 'methods' {bad or only} not among the spec's methods "
                                f"({', '.join(spec_methods)})")
            self.methods = only
        if self.kwargs is None and "kwargs" not in self.given:
            self.kwargs = {}
        if self.mmseg_model is not None:
            self._check_mmseg(where)
        else:
            self._check_timm(where)

    def _check_mmseg(self, where: str) -> None:
        self.mmseg_model = config_ref(self.mmseg_model, f"{where} ({self.name}): mmseg_model")
        w = self.weights
        if w is not None and not Path(w).is_file():
            raise SpecError(f"{where} ({self.name}): weights {w!r} (the mmseg model's backbone checkpoint) is not a "
                            "file; give a local path, or null for the config's own init")
        self.weights = str(Path(w).resolve()) if w is not None else None
        if "label" not in self.given:
            self.label = f"{self.name} ({Path(self.mmseg_model).stem})"

    def _check_timm(self, where: str) -> None:
        import timm

        from promptmatch.weights import describe_offline_weights, list_offline_weights

        if not timm.is_model(self.name):
            raise SpecError(f"{where}: {self.name!r} is not a timm model name (an mmseg model is given with "
                            "'mmseg_model': 'mmseg::_base_/models/upernet_r50.py' or a config path)")
        w = self.weights
        packaged = list_offline_weights()
        if w is not None and w not in packaged and w != "pretrained" and not Path(w).is_file():
            raise SpecError(f"{where}: weights {w!r} is neither a file, null, 'pretrained' "
                            f"(local timm cache) nor packaged weights ({', '.join(packaged)})")
        info = describe_offline_weights(w) if w in packaged else None
        if info is not None and info.model != self.name:
            raise SpecError(f"{where}: weights {w!r} are for timm's {info.model!r}, not {self.name!r}")
        if "label" not in self.given:
            self.label = self.name + (" (random init)" if w is None else " (pretrained)" if w == "pretrained"
                                      else f" ({info.pretraining})" if info is not None
                                      else f" ({Path(str(w)).name})")

    @classmethod
    def from_spec(cls, raw: Any, where: str, spec_methods: Sequence[str]) -> "BackboneEntry":
        """From a timm model name or a mapping of the fields."""
        b = {"name": raw} if isinstance(raw, str) else dict(raw)
        extra = sorted(set(b) - set(_BACKBONE_KEYS))
        if not isinstance(b.get("name"), str) or extra:
            raise SpecError(f"{where} needs a 'name' (a timm model, or a label with 'mmseg_model') "
                            f"and may have only 'weights', 'kwargs', 'label', 'num_stages', 'methods', "
                            f"'mmseg_model'; got {b!r}")
        return cls(**b, given=tuple(b), where=where, spec_methods=spec_methods)

    def to_dict(self) -> Dict[str, Any]:
        """The mapping the cells carry: the given keys in their order, then ``weights``,
        ``kwargs`` and ``label``."""
        keys = list(self.given) + [k for k in ("weights", "kwargs", "label") if k not in self.given]
        return {k: getattr(self, k) for k in keys}


def _decoder_options(name: str) -> List[str]:
    """The keyword arguments (``decoder_cfg`` keys) the registered decoder ``name`` takes."""
    import dataclasses
    import inspect

    import promptmatch.decoders as decoders

    getter = getattr(decoders, "get_decoder", None)
    cls = getter(name) if getter is not None else decoders.DECODERS[name]
    config = getattr(cls, "config_class", None)
    if config is not None and dataclasses.is_dataclass(config):
        return [f.name for f in dataclasses.fields(config)]
    params = inspect.signature(cls.__init__).parameters
    return [n for n in params if n not in ("self", "stages", "num_classes")]


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _check_lr(lr: Any, where: str) -> Any:
    if isinstance(lr, Mapping):
        lists = {}
        for k, v in lr.items():
            if not isinstance(v, (list, tuple)) or not v or not all(_positive(x) for x in v):
                raise SpecError(f"{where}: lr sweep entry {k!r} must be a non-empty list of positive numbers, "
                                f"got {v!r}")
            lists[str(k)] = [float(x) for x in v]
        if len({len(v) for v in lists.values()}) > 1:
            raise SpecError(f"{where}: every method of an lr sweep gets the same number of trials; the lists "
                            f"have lengths {({k: len(v) for k, v in lists.items()})}")
        return lists
    if lr is not None:
        if not _positive(lr):
            raise SpecError(f"{where}: setting 'lr' must be a positive number, a sweep mapping "
                            "{\"default\": [..], \"<method>\": [..]} or null, got " + repr(lr))
        return float(lr)
    return None


def check_setting(s: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """One setting with its defaults filled in, checked (decoders against the registry)."""
    from promptmatch.decoders import list_decoders

    unknown = sorted(set(s) - set(SETTING_DEFAULTS))
    if unknown:
        raise SpecError(f"{where}: unknown setting(s) {unknown}; known: {sorted(SETTING_DEFAULTS)}")
    out = {**SETTING_DEFAULTS, **s}
    if out["decoder"] not in list_decoders():
        raise SpecError(f"{where}: unknown decoder {out['decoder']!r}; available: {', '.join(list_decoders())}")
    dcfg = out["decoder_cfg"]
    if dcfg is not None:
        if not isinstance(dcfg, Mapping):
            raise SpecError(f"{where}: setting 'decoder_cfg' must be null or a mapping, got {dcfg!r}")
        known = _decoder_options(out["decoder"])
        bad = sorted(set(dcfg) - set(known))
        if bad:
            raise SpecError(f"{where}: decoder_cfg {bad} not accepted by the {out['decoder']} decoder; "
                            f"it takes {known}")
        out["decoder_cfg"] = dict(dcfg)
    for k in _INT_SETTINGS:
        low = 0 if k in ("warmup", "workers") else 1
        if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < low:
            raise SpecError(f"{where}: setting {k!r} must be an integer >= {low}, got {out[k]!r}")
    if out["image_size"] is not None and (not isinstance(out["image_size"], int) or out["image_size"] < 32):
        raise SpecError(f"{where}: setting 'image_size' must be null or an integer >= 32, got {out['image_size']!r}")
    out["lr"] = _check_lr(out["lr"], where)
    wd = out["weight_decay"]
    if wd is not None and (not isinstance(wd, (int, float)) or isinstance(wd, bool) or wd < 0):
        raise SpecError(f"{where}: setting 'weight_decay' must be null or a number >= 0, got {wd!r}")
    for k, allowed in _CHOICES.items():
        if out[k] not in allowed or (isinstance(out[k], bool) != isinstance(allowed[-1], bool)):
            raise SpecError(f"{where}: setting {k!r} must be one of {list(allowed)}, got {out[k]!r}")
    if out["eval_mode"] == "slide":
        c, st = out["eval_crop"], out["eval_stride"]
        if not (isinstance(c, int) and isinstance(st, int) and 1 <= st <= c):
            raise SpecError(f"{where}: eval_mode 'slide' needs integer 'eval_crop' and 'eval_stride' with "
                            f"1 <= eval_stride <= eval_crop, got crop {c!r}, stride {st!r}")
    ext = out["lr_extend"]
    if not isinstance(ext, int) or isinstance(ext, bool) or ext < 0:
        raise SpecError(f"{where}: setting 'lr_extend' must be an integer >= 0, got {ext!r}")
    if ext and not (isinstance(out["lr"], Mapping) and all(len(set(v)) >= 2 for v in out["lr"].values())):
        raise SpecError(f"{where}: setting 'lr_extend' extends an lr sweep beyond its ends: it needs 'lr' to be a "
                        "sweep mapping whose every list has at least two different values, got lr "
                        f"{out['lr']!r}")
    if not (isinstance(out["holdout"], (int, float)) and 0 < out["holdout"] < 1):
        raise SpecError(f"{where}: setting 'holdout' must be a fraction in (0, 1), got {out['holdout']!r}")
    return out


def _backbone_ids(backbone: Mapping[str, Any]) -> List[str]:
    """What an ``exclude`` rule may call a backbone: its label (as reports show it) or its name."""
    return list(dict.fromkeys([str(backbone.get("label") or backbone["name"]), str(backbone["name"])]))


def check_exclude(raw: Any, where: str, methods: Sequence[str], backbones: Sequence[Mapping[str, Any]],
                  datasets: Sequence[str], seeds: Sequence[Any]) -> List[Dict[str, List[Any]]]:
    """A spec's ``exclude`` rules, each ``{field: [values]}``, with the values naming datasets,
    backbones, methods and seeds checked against the spec's."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise SpecError(f"{where}: 'exclude' must be a list of rules such as "
                        f'[{{"dataset": "nuclei", "decoder": "linear"}}], got {raw!r}')
    known = {"dataset": list(datasets),
             "backbone": list(dict.fromkeys(i for b in backbones for i in _backbone_ids(b))),
             "method": list(methods), "seed": list(seeds)}
    fields = sorted(set(EXCLUDE_FIELDS) | set(SETTING_DEFAULTS))
    rules: List[Dict[str, List[Any]]] = []
    for i, rule in enumerate(raw):
        w = f"{where}: exclude[{i}]"
        if not isinstance(rule, Mapping) or not rule:
            raise SpecError(f"{w} must be a non-empty mapping of fields to values (a cell matching every "
                            f"field is left out); fields: {fields}; got {rule!r}")
        bad = sorted(set(rule) - set(fields))
        if bad:
            raise SpecError(f"{w}: unknown field(s) {bad}; an exclude rule matches {fields}")
        r = {k: as_list(v) for k, v in rule.items()}
        for k, values in r.items():
            if not values:
                raise SpecError(f"{w}: {k!r} has no values; give one value or a list")
            if k in known:
                missing = [v for v in values if v not in known[k]]
                if missing:
                    raise SpecError(f"{w}: {k} {missing} not in the spec; its {k}s: "
                                    f"{', '.join(map(str, known[k]))}")
        rules.append(r)
    return rules


def excluded_by(rule: Mapping[str, List[Any]], dataset: str, backbone: Mapping[str, Any], method: str, seed: int,
                settings: Mapping[str, Any]) -> bool:
    """Whether a cell (its dataset name, backbone entry, method label, seed and resolved
    settings) matches every field of an ``exclude`` rule."""
    values = {"dataset": [dataset], "backbone": _backbone_ids(backbone), "method": [method], "seed": [seed]}
    return all(any(x in v for x in values.get(k, [settings.get(k)])) for k, v in rule.items())
