"""Building timm backbones offline, with local pretrained weights."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["create_backbone", "input_normalisation", "WeightsNotFoundError", "ALLOW_DOWNLOAD_ENV"]

_logger = logging.getLogger(__name__)

ALLOW_DOWNLOAD_ENV = "PROMPTMATCH_ALLOW_DOWNLOAD"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not available locally."""


def _download_allowed() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "0").lower() in ("1", "true", "yes")


def _cached_pretrained_file(name: str) -> Optional[str]:
    """A local copy of timm's default weights for ``name`` (HF or torch hub cache), if any."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = hub_id.partition("@")
            for fname in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(repo, fname, revision=revision or None)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        except Exception:  # pragma: no cover - huggingface_hub missing or cache unreadable
            pass
    url = getattr(cfg, "url", None)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if path.is_file():
            return str(path)
    return None


Triple = Tuple[float, float, float]


def _cfg_stats(cfg: Any) -> Optional[Tuple[Triple, Triple]]:
    """``(mean, std)`` of a timm pretrained config (a dict or a ``PretrainedCfg``), if it has both."""
    if cfg is None:
        return None
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    mean, std = get("mean"), get("std")
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except TypeError:
        return None
    return (mean, std) if len(mean) == 3 and len(std) == 3 else None  # type: ignore[return-value]


def input_normalisation(backbone: Union[nn.Module, str]) -> Tuple[Triple, Triple]:
    """The per-channel ``(mean, std)`` on the 0..1 scale that ``backbone``'s pretrained weights
    expect: its timm ``pretrained_cfg`` (for a model or a timm model name; e.g. 0.5 / 0.5 for
    ``vit_base_patch16_224``, CLIP's statistics for CLIP models), ImageNet's where none is
    recorded. Every promptmatch path that normalises raw images (the folder engine, the
    in-memory benchmark, :func:`promptmatch.predict`) uses it through the segmentor's
    ``input_normalisation``."""
    from .constants import IMAGENET_MEAN, IMAGENET_STD

    if isinstance(backbone, str):
        try:
            from timm.models import get_pretrained_cfg

            found = _cfg_stats(get_pretrained_cfg(backbone))
        except Exception:  # an unknown name: no record
            found = None
        return found or (IMAGENET_MEAN, IMAGENET_STD)
    for m in (backbone, getattr(backbone, "model", None)):  # mmseg's TimmBackbone wraps the timm model
        if isinstance(m, nn.Module):
            found = _cfg_stats(getattr(m, "pretrained_cfg", None))
            if found:
                return found
    return IMAGENET_MEAN, IMAGENET_STD


def _model_kwargs_for_segmentation(name: str) -> dict:
    """Keyword arguments that let token models take any crop size a multiple of the patch."""
    return {"dynamic_img_size": True}


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: Optional[Union[str, os.PathLike]] = None,
    weights_remap: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Create a plain timm model to be used as a frozen segmentation backbone.

    Args:
        name: a timm model name, e.g. ``"vit_base_patch16_224"``.
        pretrained: load timm's default pretrained weights, from the local Hugging Face or
            torch hub cache only; never downloads unless ``PROMPTMATCH_ALLOW_DOWNLOAD=1``.
        weights: a local ``.safetensors`` / ``.pth`` file with pretrained weights; loaded
            through timm's own key filter (implies ``pretrained``).
        weights_remap: match the keys of ``weights`` to the model's by order (checking
            shapes), for checkpoints that use other key names.
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``depth``).

    Token models (ViT, DeiT, EVA, DINOv2, Swin) are created with ``dynamic_img_size=True``
    so that they take any crop whose sides are multiples of the patch size.
    """
    import timm

    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone name must be a non-empty string, got {name!r}")
    if not timm.list_models(name) and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar names: {close}" if close else ""))
    kwargs.setdefault("num_classes", 0)
    seg_kwargs = _model_kwargs_for_segmentation(name)

    file: Optional[str] = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist")
        if path.suffix not in _WEIGHT_SUFFIXES:
            raise ValueError(f"weights file must be one of {_WEIGHT_SUFFIXES}, got {path.name!r}")
        file = str(path)
    elif pretrained:
        file = _cached_pretrained_file(name)
        if file is None and not _download_allowed():
            raise WeightsNotFoundError(
                f"pretrained weights for {name!r} are not available offline (not in the local "
                "Hugging Face or torch hub cache). Pass a local file: "
                f"create_backbone({name!r}, weights='/path/to/{name}.safetensors') (or .pth); "
                f"or set {ALLOW_DOWNLOAD_ENV}=1 to let timm download them."
            )

    def build(extra: dict) -> nn.Module:
        if file is not None and not weights_remap:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **extra, **kwargs
            )
        if pretrained and file is None:  # download explicitly allowed
            return timm.create_model(name, pretrained=True, **extra, **kwargs)
        return timm.create_model(name, pretrained=False, **extra, **kwargs)

    try:
        model = build(seg_kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        model = build({})
    if file is not None and weights_remap:
        _load_remapped(model, file)
    if file is not None:
        _logger.info("loaded pretrained weights for %s from %s", name, file)
    try:  # how to build it again (promptmatch.save_segmentor records it), when it is plain data
        import json

        json.dumps(kwargs)
        model._promptmatch_backbone_kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    except TypeError:
        pass
    return model


def _load_remapped(model: nn.Module, file: str) -> None:
    """Load a checkpoint whose keys differ from the model's, matching tensors by order."""
    from .records import read_state_dict

    state = read_state_dict(file)
    own = model.state_dict()
    own_keys = [k for k in own if not k.endswith("num_batches_tracked")]
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    mapped = {}
    for k, (sk, sv) in zip(own_keys, src):
        if own[k].shape != sv.shape:
            break
        mapped[k] = sv
    # trailing classifier tensors may be missing (num_classes=0) or differ in shape
    missing = [k for k in own_keys if k not in mapped]
    if len(mapped) < len(own_keys) or missing:
        raise ValueError(
            f"cannot remap {file}: matched {len(mapped)} of {len(own_keys)} tensors by order before "
            f"a shape mismatch at {missing[:1]}"
        )
    model.load_state_dict(mapped, strict=False)
