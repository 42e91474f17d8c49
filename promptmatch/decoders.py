"""Segmentation decoders that read the boundary features of a staged backbone, registered by name.

Each decoder is an ``nn.Module`` class built as ``cls(stages, num_classes, **config fields)``,
with a dataclass config (its ``config_class``) and a name given by :func:`register_decoder`;
:func:`build_decoder` builds one from a name or a config. See docs/api.md, "Adding a decoder".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._config import DataclassConfig
from .staging import Stage

__all__ = [
    "DecoderConfig",
    "LinearDecoderConfig",
    "MultiLevelDecoderConfig",
    "LinearDecoder",
    "MultiLevelDecoder",
    "register_decoder",
    "get_decoder",
    "list_decoders",
    "build_decoder",
    "decoder_config",
    "DECODERS",
]


@dataclasses.dataclass
class DecoderConfig(DataclassConfig):
    """Base class of decoder configs: plain, JSON-serialisable dataclasses whose fields are the
    decoder's keyword arguments."""

    #: the registered name of the decoder this config builds (set by :func:`register_decoder`)
    decoder_name = ""


@dataclasses.dataclass
class LinearDecoderConfig(DecoderConfig):
    """Config of :class:`LinearDecoder`."""

    dropout: float = dataclasses.field(default=0.0, metadata={"help": "Dropout2d before the classifier"})
    norm: bool = dataclasses.field(default=True, metadata={
        "help": "BatchNorm before the classifier (off: mmseg's FCNHead without convolutions, with dropout 0.1)"})
    init_std: Optional[float] = dataclasses.field(default=None, metadata={
        "help": "classifier weights drawn from N(0, init_std^2) with zero bias, as mmseg's decode heads "
                "(0.01); None: PyTorch's default (uniform)"})

    def __post_init__(self) -> None:
        v = self.init_std
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"LinearDecoderConfig.init_std must be None or a positive number, got {v!r}")


@dataclasses.dataclass
class MultiLevelDecoderConfig(DecoderConfig):
    """Config of :class:`MultiLevelDecoder`."""

    embed_dim: int = dataclasses.field(default=128, metadata={"help": "channels every stage is projected to"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "Dropout2d before the classifier"})
    levels: Optional[Tuple[int, ...]] = dataclasses.field(default=None, metadata={
        "help": "indices of the stages the decoder reads (negative from the end; None: every stage): "
                "e.g. a backbone staged at every block, read at the four levels of its default division"})

    def __post_init__(self) -> None:
        if self.levels is not None:
            lv = tuple(self.levels)
            if not lv or not all(isinstance(i, int) and not isinstance(i, bool) for i in lv) or len(set(lv)) != len(lv):
                raise ValueError(f"MultiLevelDecoderConfig.levels must be None or distinct ints, got {self.levels!r}")
            self.levels = lv


#: registered decoders, name -> class
DECODERS: Dict[str, Type[nn.Module]] = {}

_D = TypeVar("_D", bound=Type[nn.Module])


def register_decoder(name: str) -> Callable[[_D], _D]:
    """Class decorator: make a decoder selectable by ``name``.

    The class is built as ``cls(stages, num_classes, **config.to_dict())`` and names its
    config dataclass (a :class:`DecoderConfig` subclass whose fields are its keyword
    arguments) in the class attribute ``config_class``. It may define
    ``stages_read(num_stages)``: the indices of the stages whose features it reads.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a decoder needs a non-empty name, got {name!r}")

    def add(cls: _D) -> _D:
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, DecoderConfig)
                and dataclasses.is_dataclass(config_class)):
            raise TypeError(f"decoder {cls.__name__} needs a `config_class`: a DecoderConfig dataclass")
        if name in DECODERS and DECODERS[name] is not cls:
            raise ValueError(f"a decoder named {name!r} is already registered ({DECODERS[name].__name__})")
        if config_class.decoder_name and config_class.decoder_name != name:
            raise ValueError(f"{config_class.__name__} already configures the decoder {config_class.decoder_name!r}")
        config_class.decoder_name = name
        DECODERS[name] = cls
        return cls

    return add


@register_decoder("linear")
class LinearDecoder(nn.Module):
    """The linear decoder of the benchmarking protocol: one linear map on the last features.

    A BatchNorm before the linear layer puts the frozen features of any family on one
    scale (ViT block outputs have channels of very different magnitude); it folds into the
    linear layer at inference.
    """

    config_class = LinearDecoderConfig

    def __init__(self, stages: Sequence[Stage], num_classes: int, dropout: float = 0.0, norm: bool = True,
                 init_std: Optional[float] = None) -> None:
        super().__init__()
        c = stages[-1].channels
        self.norm = nn.BatchNorm2d(c) if norm else nn.Identity()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(c, num_classes, 1)
        if init_std is not None:
            nn.init.normal_(self.classifier.weight, 0.0, float(init_std))
            nn.init.zeros_(self.classifier.bias)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(features[-1])))

    def stages_read(self, num_stages: int) -> Tuple[int, ...]:
        """The stage indices whose features this decoder reads: the last one."""
        return (num_stages - 1,)


@register_decoder("multilevel")
class MultiLevelDecoder(nn.Module):
    """A light multi-level head: every stage projected to ``embed_dim``, brought to the finest
    stage's grid, concatenated, fused and classified (in the spirit of SegFormer's head)."""

    config_class = MultiLevelDecoderConfig

    def __init__(
        self, stages: Sequence[Stage], num_classes: int, embed_dim: int = 128, dropout: float = 0.0,
        levels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        n = len(stages)
        if levels is None:
            self.levels: Tuple[int, ...] = tuple(range(n))
        else:
            bad = [i for i in levels if not -n <= i < n]
            if bad:
                raise ValueError(f"decoder levels {bad} out of range for a backbone with {n} stages")
            self.levels = tuple(sorted({i % n for i in levels}))
        read = [stages[i] for i in self.levels]
        self.proj = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(s.channels), nn.Conv2d(s.channels, embed_dim, 1)) for s in read
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(read), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        features = [features[i] for i in self.levels]
        size = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        maps = []
        for proj, f in zip(self.proj, features):
            y = proj(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            maps.append(y)
        return self.classifier(self.dropout(self.fuse(torch.cat(maps, 1))))

    def stages_read(self, num_stages: int) -> Tuple[int, ...]:
        """The stage indices whose features this decoder reads: its ``levels`` (default: all)."""
        return self.levels


def list_decoders() -> List[str]:
    """The names of the registered decoders, sorted."""
    return sorted(DECODERS)


def get_decoder(name: str) -> Type[nn.Module]:
    """The decoder class registered as ``name``."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; available decoders: {list_decoders()}")
    return DECODERS[name]


def decoder_config(name: str, config: Optional[Union[DecoderConfig, Mapping[str, Any]]] = None) -> DecoderConfig:
    """The config of decoder ``name``: ``config`` checked (a dataclass of the decoder's
    ``config_class`` or a dict of its fields), or the defaults. ``ValueError`` for a field the
    decoder does not take or a config of another decoder."""
    cls = get_decoder(name)
    if config is None:
        return cls.config_class()
    if isinstance(config, DecoderConfig):
        if not isinstance(config, cls.config_class):
            raise ValueError(f"bad decoder_cfg for {name!r}: it takes a {cls.config_class.__name__}, "
                             f"got {type(config).__name__}")
        return config
    # a dataclass rejects unknown or ill-typed keyword arguments with TypeError
    try:
        return cls.config_class.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad decoder_cfg for {name!r}: {e}") from None


def build_decoder(
    name: Union[str, DecoderConfig],
    stages: Sequence[Stage],
    num_classes: int,
    config: Optional[Union[DecoderConfig, Mapping[str, Any]]] = None,
) -> nn.Module:
    """Build a registered decoder reading ``stages``, for ``num_classes`` classes.

    ``name``: the decoder's name, or its config dataclass (then ``config`` must be None).
    ``config``: its config dataclass or a dict of the config's fields (default: the defaults).
    """
    if isinstance(name, DecoderConfig):
        if config is not None:
            raise TypeError("build_decoder takes a config either as its first argument or as config=, not both")
        name, config = type(name).decoder_name, name
    cfg = decoder_config(name, config)
    # the decoder's own argument checks raise TypeError for values of the wrong kind
    try:
        return DECODERS[name](stages, num_classes, **cfg.to_dict())
    except TypeError as e:
        raise ValueError(f"bad decoder_cfg for {name!r}: {e}") from None
