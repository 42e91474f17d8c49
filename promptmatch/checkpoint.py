"""Prompt checkpoints: the trainable weights of one dataset, without the frozen backbone.

A prompt checkpoint is one ``.safetensors`` file whose metadata carries a JSON record
(method and its config, decoder, classes, library version, backbone identity); a copy of
that record is written beside it as ``<name>.json`` for people and tools. No pickle is
involved anywhere; writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Type

import torch
from torch import nn

from .core import PromptCheckpointable, trainable_backbone_keys, trainable_state_dict
from .records import (
    PROMPT_METADATA_KEY,
    SEGMENTOR_METADATA_KEY,
    PathLike,
    atomic_write_bytes,
    check_suffix,
    load_checked_tensors,
    read_metadata,
    read_state_dict,
    refuse_non_finite,
    tensor_checksum,
    write_record,
)
from .version import __version__

__all__ = [
    "PromptMismatchError",
    "PromptChecksumError",
    "tensor_checksum",
    "save_prompts",
    "load_prompts",
    "read_prompt_metadata",
    "read_prompt_tensors",
    "backbone_fingerprint",
    "backbone_architecture",
    "describe_model",
    "identity_differences",
    "check_identity",
    "trainable_state_dict",
    "read_state_dict",
    "atomic_write_bytes",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1


class PromptMismatchError(ValueError):
    """A prompt checkpoint does not belong to the model it is loaded onto."""


class PromptChecksumError(PromptMismatchError):
    """A prompt checkpoint's tensor data differs from what was written (a damaged or altered file)."""


def _frozen_backbone_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    if not hasattr(model, "backbone"):
        return dict(model.state_dict())
    trainable = trainable_backbone_keys(model)
    return {k: v for k, v in model.backbone.state_dict().items() if k not in trainable}


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash that identifies the frozen backbone weights (names, shapes, values).

    Every tensor contributes its name, shape, dtype, its sum and a strided sample of its
    values, so that any two different pretrained checkpoints differ while a ViT-B hashes
    in well under a second.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(_frozen_backbone_tensors(model).items()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            if flat.is_floating_point() or flat.is_complex():
                flat = flat.float()
            else:
                flat = flat.double()
            step = max(1, flat.numel() // 1024)
            sample = flat[::step][:1024].cpu().double()
            h.update(sample.numpy().tobytes())
            h.update(repr(round(float(flat.double().sum()), 6)).encode())
    return h.hexdigest()[:24]


def backbone_architecture(backbone: nn.Module) -> str:
    """The timm architecture name of a backbone, or its class path."""
    for obj in (backbone, getattr(backbone, "model", None)):
        cfg = getattr(obj, "pretrained_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return f"{type(backbone).__module__}.{type(backbone).__qualname__}"


def describe_model(
    model: nn.Module,
    *,
    method: str,
    method_config: Mapping[str, Any],
    decoder: str,
    decoder_config: Mapping[str, Any],
    num_classes: int,
    class_names: Optional[List[str]],
    ignore_index: int,
    architecture: str,
    input_normalisation: Optional[Any] = None,
) -> Dict[str, Any]:
    """The identity record a prompt checkpoint stores and :func:`load_prompts` checks
    (``input_normalisation`` is recorded, not checked: see :func:`recorded_normalisation`)."""
    record = {
        "method": method,
        "method_config": dict(method_config),
        "decoder": decoder,
        "decoder_config": dict(decoder_config),
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "ignore_index": ignore_index,
        "backbone": {
            "architecture": architecture,
            "fingerprint": backbone_fingerprint(model),
            "stage_modules": [s.module for s in model.staged.stages],
        },
    }
    if input_normalisation is not None:
        mean, std = input_normalisation
        record["input_normalisation"] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return record


def recorded_normalisation(meta: Mapping[str, Any]) -> Any:
    """``(mean, std)`` a checkpoint's model normalised raw images with; ImageNet's for files
    written before it was recorded (2026-12-06), which is what promptmatch's folder engine,
    in-memory benchmark and ``predict`` used for every backbone until then."""
    from .constants import IMAGENET_MEAN, IMAGENET_STD

    rec = meta.get("input_normalisation")
    if not rec:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in rec["mean"]), tuple(float(v) for v in rec["std"])


def _metadata(model: nn.Module, extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if not isinstance(model, PromptCheckpointable):
        raise TypeError(f"save_prompts needs a prompted model (PromptSegmentor, PromptEncoderDecoder: "
                        f"see promptmatch.core.PromptCheckpointable), got {type(model).__name__}")
    meta = {"format_version": FORMAT_VERSION, "library": "promptmatch", "library_version": __version__}
    meta.update(model.describe())
    if extra:
        meta["extra"] = dict(extra)
    return meta


def _normalise_path(path: PathLike) -> Path:
    return check_suffix(path, "prompt checkpoints")


def save_prompts(model: nn.Module, path: PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the trainable weights of ``model`` and its identity to ``path`` (``.safetensors``).

    Also writes ``<path without suffix>.json`` with the same metadata. Returns the path.
    Raises :class:`~promptmatch.divergence.NonFiniteError` (and leaves any existing file
    untouched) if a tensor holds NaN or infinite values: a diverged model never replaces
    a good checkpoint.
    """
    path = _normalise_path(path)
    meta = _metadata(model, extra)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state_dict().items()}
    refuse_non_finite(tensors, path, "prompt checkpoint", "; training has diverged")
    meta["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    meta["tensor_sha256"] = tensor_checksum(tensors)
    write_record(path, tensors, PROMPT_METADATA_KEY, meta)
    return path


def read_prompt_metadata(path: PathLike) -> Dict[str, Any]:
    """The JSON record stored in a prompt checkpoint."""
    path = _normalise_path(path)
    all_meta = read_metadata(path, "prompt checkpoint")
    raw = all_meta.get(PROMPT_METADATA_KEY)
    if raw is None:
        hint = (": it is a merged segmentor (backbone + prompts); load it with promptmatch.load_segmentor(path)"
                if SEGMENTOR_METADATA_KEY in all_meta else "")
        raise PromptMismatchError(f"{str(path)!r} is a safetensors file but not a promptmatch prompt checkpoint"
                                  + hint)
    meta = json.loads(raw)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise PromptMismatchError(
            f"{str(path)!r} uses prompt format {meta['format_version']}; this promptmatch "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade promptmatch"
        )
    return meta


def read_prompt_tensors(path: PathLike, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a prompt checkpoint, checked against the checksum stored when it was
    written (:class:`PromptChecksumError` if they differ; files without one are not checked).
    ``meta``: the file's record, if already read."""
    path = _normalise_path(path)
    want = (meta if meta is not None else read_prompt_metadata(path)).get("tensor_sha256")
    return load_checked_tensors(path, want, error=PromptChecksumError, kind="prompt checkpoint",
                                remedy="train it again")


def identity_differences(want: Mapping[str, Any], got: Mapping[str, Any]) -> List[str]:
    """How a stored identity record ``got`` differs from a model's ``want`` (its ``describe()``):
    one line per field (backbone, classes, method and its config, decoder), empty if they agree."""
    diffs = []
    wb, gb = want["backbone"], got.get("backbone", {})
    for field in ("architecture", "fingerprint", "stage_modules"):
        if wb.get(field) != gb.get(field):
            diffs.append(f"backbone.{field}: checkpoint has {gb.get(field)!r}, model has {wb.get(field)!r}")
    if want["num_classes"] != got.get("num_classes"):
        diffs.append(f"num_classes: checkpoint has {got.get('num_classes')!r}, model has {want['num_classes']!r}")
    elif want.get("class_names") and got.get("class_names") and want["class_names"] != got["class_names"]:
        diffs.append(f"class_names: checkpoint has {got['class_names']!r}, model has {want['class_names']!r}")
    if want["method"] != got.get("method"):
        diffs.append(f"method: checkpoint has {got.get('method')!r}, model has {want['method']!r}")
    else:
        from .methods import get_method, saved_method_config

        saved = got.get("method_config") or {}
        wc, gc = want["method_config"], saved_method_config(got["method"], saved)
        config_diffs = [f"method_config.{k}: checkpoint has {gc.get(k)!r}, model has {wc.get(k)!r}"
                        for k in sorted(set(wc) | set(gc)) if wc.get(k) != gc.get(k)]
        if config_diffs:
            try:
                cfg_cls = get_method(got["method"]).config_class
            except ValueError:
                cfg_cls = None
            older = sorted(set(getattr(cfg_cls, "SAVED_BEFORE", {})) - set(saved))
            named = [n for n, c in (cfg_cls.named_settings() if cfg_cls is not None else {}).items()
                     if c.to_dict() == gc]
            if named:  # the settings of a named (earlier) version: say which
                config_diffs.append(f"(the checkpoint was trained with promptmatch.{named[0]}: build the model "
                                    f"with method_cfg=promptmatch.{named[0]})")
            elif older:  # saved before some fields existed: say how to rebuild the model it came from
                config_diffs.append(
                    f"(the checkpoint was saved before the fields {older} existed; build the model with the "
                    f"settings it was trained with: {getattr(cfg_cls, 'SAVED_BEFORE_HINT', 'its method_config')})")
        diffs.extend(config_diffs)
    for field in ("decoder", "decoder_config"):
        if want[field] != got.get(field):
            diffs.append(f"{field}: checkpoint has {got.get(field)!r}, model has {want[field]!r}")
    return diffs


def check_identity(want: Mapping[str, Any], got: Mapping[str, Any], what: str,
                   error: Type[Exception] = PromptMismatchError) -> None:
    """Raise ``error`` (``what``, then one line per field, see :func:`identity_differences`)
    if the stored identity ``got`` differs from a model's ``want``."""
    diffs = identity_differences(want, got)
    if diffs:
        raise error(f"{what}:\n  - " + "\n  - ".join(diffs))


def load_prompts(model: nn.Module, path: PathLike) -> Dict[str, Any]:
    """Load a prompt checkpoint onto ``model``, refusing one that belongs to another model.

    Checks the backbone identity (architecture and weight fingerprint), classes, method and
    its config, decoder, and every tensor's name and shape before changing any weight:
    on a mismatch, :class:`PromptMismatchError` names each field that differs and the model
    is left untouched. Returns the checkpoint's metadata.
    """
    meta = read_prompt_metadata(path)
    check_identity(model.describe(), meta, f"prompt checkpoint {str(path)!r} does not match this model")
    tensors = read_prompt_tensors(path, meta)
    own = model.trainable_state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if tuple(tensors[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:6]}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:6]))
        raise PromptMismatchError(f"prompt checkpoint {str(path)!r} does not match this model: " + ", ".join(parts))
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    if hasattr(model, "input_normalisation"):  # predict with what it was trained with
        model.input_normalisation = recorded_normalisation(meta)
    return meta
