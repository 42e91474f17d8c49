"""The base of promptmatch's config dataclasses (method and decoder configs)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple, Type, TypeVar

__all__ = ["DataclassConfig"]

C = TypeVar("C", bound="DataclassConfig")


class DataclassConfig:
    """Plain, JSON-serialisable dataclass configs: ``to_dict`` (tuples as lists) and
    ``from_dict``, which refuses unknown fields by name."""

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The names of this config's fields (none for an undecorated base class)."""
        return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
        names = set(cls.field_names())
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {unknown}; known fields: {sorted(names)}")
        return cls(**dict(data))
