"""Adding an offline dataset: :func:`register_offline_dataset` checks an
:class:`OfflineDatasetSpec` against the scene generators and source images and makes it
buildable by name (``build_offline_dataset``, the benchmark's ``offline`` source)."""
from __future__ import annotations

from .scenes import _SCENE_MAKERS
from .sources import _SOURCES
from .specs import _REGISTRY, IGNORE_INDEX, OfflineDatasetSpec

__all__ = ["register_offline_dataset", "unregister_offline_dataset"]


def register_offline_dataset(spec: OfflineDatasetSpec) -> OfflineDatasetSpec:
    """Make ``spec`` an offline dataset under ``spec.name``; returns it.

    Raises:
        ValueError: the name is taken by another spec, the kind has no scene generator, a
            source key is unknown, the palette does not give one colour per class, a
            mosaic has more regions than classes (without ``class_weights``), or the classes
            do not fit below :data:`IGNORE_INDEX`.
    """
    if not isinstance(spec, OfflineDatasetSpec):
        raise TypeError(f"register_offline_dataset takes an OfflineDatasetSpec, got {type(spec).__name__}")
    problems = []
    if not spec.name or "/" in spec.name or spec.name.startswith("."):
        problems.append(f"name {spec.name!r} must be a non-empty folder name")
    elif spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        problems.append(f"an offline dataset named {spec.name!r} is already registered")
    if spec.kind not in _SCENE_MAKERS:
        problems.append(f"kind {spec.kind!r} has no scene generator; available: {', '.join(sorted(_SCENE_MAKERS))}")
    unknown = [k for k in spec.all_sources if k not in _SOURCES]
    if unknown:
        problems.append(f"unknown source image(s) {unknown}; available: {', '.join(sorted(_SOURCES))}")
    if len(spec.palette) != len(spec.classes) or not spec.classes:
        problems.append(f"{len(spec.classes)} classes but {len(spec.palette)} palette colours; give one per class")
    regions = spec.layout.get("regions", (3, 5))[1]
    if spec.kind == "mosaic" and spec.class_weights is None and regions > len(spec.classes):
        problems.append(f"a mosaic draws up to {regions} regions of distinct classes but has {len(spec.classes)} "
                        "classes: set layout={'regions': (lo, hi)} with hi <= the number of classes, or "
                        "class_weights")
    if len(spec.classes) > IGNORE_INDEX:
        problems.append(f"{len(spec.classes)} classes do not fit below the ignore index {IGNORE_INDEX}")
    if problems:
        raise ValueError(f"cannot register offline dataset {spec.name!r}: " + "; ".join(problems))
    _REGISTRY[spec.name] = spec
    return spec


def unregister_offline_dataset(name: str) -> None:
    """Forget the offline dataset ``name`` (its built copy on disk is left as it is)."""
    if name not in _REGISTRY:
        raise ValueError(f"no offline dataset named {name!r} is registered")
    del _REGISTRY[name]
