"""The dataset-source protocol: one :class:`DataSource` per kind of dataset entry in a
benchmark spec, each with a typed entry (:class:`DatasetEntry`), and their registry."""
from __future__ import annotations

import hashlib
import json
from dataclasses import InitVar, dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from ..errors import SpecError

__all__ = ["DatasetEntry", "DataSource", "register_source", "unregister_source", "get_source", "list_sources",
           "as_list",
           "subset_config", "DIGEST_KEYS"]

#: The entry keys a dataset's cell-key digest is made of (see :meth:`DataSource.key_part`);
#: fixed, so that the keys of recorded cells stay valid.
DIGEST_KEYS: Tuple[str, ...] = ("folder", "mmseg_config", "data_root", "classes", "reduce_zero_label",
                                "train_split", "splits", "img_suffix", "seg_map_suffix")


def as_list(v: Any) -> List[Any]:
    """``v`` as a list (a single value becomes a one-element list)."""
    return list(v) if isinstance(v, (list, tuple)) else [v]


def subset_config(cfg: Dict[str, Any], indices: Optional[Sequence[int]]) -> Dict[str, Any]:
    """An mmseg dataset config restricted to the samples at ``indices`` (None: all of them)."""
    if indices is None:
        return cfg
    return dict(type="promptmatch.SubsetDataset", dataset=cfg, indices=list(indices))


@dataclass
class DatasetEntry:
    """A validated dataset entry of a spec: the fields every source shares.

    A source's entry type subclasses this with its own fields (each with a default) and
    checks them in ``__post_init__``, raising :class:`SpecError` with ``where`` (the place in
    the spec) in the message. :meth:`to_dict` gives the plain mapping the cells carry.

    Attributes:
        name: the dataset's name in the spec (and in reports).
        splits: the evaluation splits (None: the source's default, :attr:`default_splits`).
        eval_on: names of other datasets of the spec this one's models are evaluated on.
        eval_only: only evaluated on (a target of another entry's ``eval_on``).
        given: the keys the spec gave, in its order (so :meth:`to_dict` keeps that order).
    """

    name: str
    splits: Any = None
    eval_on: Any = field(default_factory=list)
    eval_only: Any = False
    given: Tuple[str, ...] = field(default=(), repr=False, compare=False)
    where: InitVar[str] = "spec"

    def __post_init__(self, where: str) -> None:
        splits = as_list(self.default_splits() if self.splits is None else self.splits)
        self.check_splits(splits, where)
        if not splits or not all(isinstance(s, str) for s in splits):
            raise SpecError(f"{where}: 'splits' must be a non-empty list of split names, got {splits!r}")
        self.splits = list(splits)
        self.eval_on = [str(t) for t in as_list(self.eval_on)]
        self.eval_only = bool(self.eval_only)

    def default_splits(self) -> List[str]:
        """The evaluation splits when the entry names none."""
        return ["val"]

    def check_splits(self, splits: List[str], where: str) -> None:
        """Refuse splits this source cannot evaluate on (raises :class:`SpecError`)."""

    @classmethod
    def keys(cls) -> List[str]:
        """The keys a spec entry of this type may have (besides ``name`` and ``source``)."""
        return [f.name for f in fields(cls) if f.name not in ("name", "given")]

    def to_dict(self, source: str) -> Dict[str, Any]:
        """The entry as the mapping the cells carry: the given keys in their order, then
        ``source``, the source's own fields that hold a value (not None), ``splits``,
        ``eval_on`` and ``eval_only``."""
        own = [f.name for f in fields(self) if f.name not in _COMMON and getattr(self, f.name) is not None]
        out: Dict[str, Any] = {}
        for k in (*self.given, "name", "source", *own, "splits", "eval_on", "eval_only"):
            if k not in out:
                out[k] = source if k == "source" else getattr(self, k)
        return out


#: the fields of every entry (the rest are a source's own)
_COMMON = frozenset(f.name for f in fields(DatasetEntry))


class DataSource:
    """One kind of dataset entry in a benchmark spec (``"source": <name>``).

    Subclass it, set :attr:`name` and :attr:`entry_class`, implement :meth:`classes` and at
    least one of :meth:`arrays` (the in-memory engine) and :meth:`mmseg_dataset` (the
    mmengine engine), and register it with :func:`register_source`. The methods receive the
    entry as the mapping :meth:`DatasetEntry.to_dict` made (cells carry plain mappings, so
    they survive the trip to a child process as JSON).
    """

    #: the value of ``source`` in a spec entry
    name: ClassVar[str] = ""
    #: the typed entry, built and validated from the spec's mapping
    entry_class: ClassVar[Type[DatasetEntry]] = DatasetEntry
    #: engine of a cell on a timm backbone when the setting names none
    default_engine: ClassVar[str] = "mmengine"
    #: whether the in-memory engine can load it (:meth:`arrays`)
    in_memory: ClassVar[bool] = True
    #: count the training split before any training even without an lr sweep (a config may
    #: point at an empty data root)
    count_train_always: ClassVar[bool] = False
    #: the entry keys whose values make the digest of :meth:`key_part`
    digest_keys: ClassVar[Tuple[str, ...]] = DIGEST_KEYS

    def parse(self, raw: Mapping[str, Any], where: str) -> Dict[str, Any]:
        """Validate a spec's entry (``name`` checked, ``source`` set) and normalise it."""
        allowed = {"name", "source", *self.entry_class.keys()}
        extra = sorted(set(raw) - allowed)
        if extra:
            raise SpecError(f"{where}: unknown key(s) {extra} for a {self.name} dataset; allowed: {sorted(allowed)}")
        given = tuple(raw)
        kwargs = {k: v for k, v in raw.items() if k != "source"}
        return self.entry_class(**kwargs, given=given, where=where).to_dict(self.name)

    def key_part(self, entry: Mapping[str, Any]) -> str:
        """The dataset's part of a cell key: ``name@<digest of where its data comes from>``,
        so another folder or config under the same name is another cell."""
        what = {k: entry.get(k) for k in self.digest_keys}
        return f"{entry['name']}@{hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]}"

    def classes(self, entry: Mapping[str, Any]) -> List[str]:
        """The class names, label value ``i`` being ``classes[i]``."""
        raise NotImplementedError

    def num_classes(self, entry: Mapping[str, Any]) -> int:
        """The number of classes."""
        return len(self.classes(entry))

    def native_size(self, entry: Mapping[str, Any]) -> Optional[int]:
        """The side of the (square) images when the source knows it, else None."""
        return None

    def prepare(self, entry: Mapping[str, Any]) -> None:
        """Make the data ready once before the cells run (e.g. build it); nothing by default."""

    def problems(self, entry: Mapping[str, Any], deep: bool, progress: bool
                 ) -> Tuple[List[str], Optional[List[str]]]:
        """``(problems, classes)`` before any training: every problem found with the data
        (``deep``: read every file), and the class names (None when they cannot be read).
        A :class:`SpecError` raised here is recorded as a problem."""
        return [], self.classes(entry)

    def native_size_problem(self, entry: Mapping[str, Any], split: str) -> Optional[str]:
        """Why the in-memory engine cannot load ``split`` at the images' own size (a setting's
        ``image_size`` null), e.g. images of several sizes; None when it can. Called before
        any training, after the data checks (data that cannot be read is reported there)."""
        return None

    def train_count(self, entry: Mapping[str, Any]) -> int:
        """The number of samples in the training split."""
        raise NotImplementedError(f"the {self.name} source cannot count its training split")

    def arrays(self, entry: Mapping[str, Any], split: str, size: Optional[int]) -> Tuple[Any, Any]:
        """``(images, labels)`` of one split for the in-memory engine: uint8 ``(N, H, W, 3)``
        and ``(N, H, W)`` numpy arrays (resized to ``size`` where the source resizes itself)."""
        raise SpecError(f"dataset {entry['name']!r}: the memory engine cannot load an {self.name} dataset")

    def mmseg_dataset(self, entry: Mapping[str, Any], split: str, pipeline: List[Dict[str, Any]], train: bool,
                      crop: Tuple[int, int], indices: Optional[List[int]], explicit_size: bool
                      ) -> Tuple[Dict[str, Any], Optional[Tuple[int, int]]]:
        """An mmseg dataset config of one split with ``pipeline`` (the benchmarking recipe's),
        and the crop size the source's own config names (None: it names none)."""
        raise SpecError(f"dataset {entry['name']!r}: the {self.name} source has no mmseg dataset config")


_REGISTRY: Dict[str, DataSource] = {}


def register_source(cls: Type[DataSource]) -> Type[DataSource]:
    """Class decorator: make a :class:`DataSource` usable as ``"source": cls.name`` in specs."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"a dataset source named {cls.name!r} is already registered "
                         f"({type(_REGISTRY[cls.name]).__name__})")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_source(name: str) -> None:
    """Forget the registered source ``name`` (e.g. a test's toy source)."""
    if name not in _REGISTRY:
        raise ValueError(f"no dataset source named {name!r} is registered")
    del _REGISTRY[name]


def list_sources() -> Tuple[str, ...]:
    """Names of the registered dataset sources."""
    return tuple(_REGISTRY)


def get_source(name: str) -> DataSource:
    """The registered source ``name``."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown dataset source {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
