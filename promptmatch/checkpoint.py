"""Prompt checkpoints: the trainable weights of one dataset, without the frozen backbone.

A prompt checkpoint is one ``.safetensors`` file whose metadata carries a JSON record
(method and its config, decoder, classes, library version, backbone identity); a copy of
that record is written beside it as ``<name>.json`` for people and tools. No pickle is
involved anywhere; writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .divergence import NonFiniteError, non_finite_tensors
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
    "read_state_dict",
    "atomic_write_bytes",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_META_KEY = "promptmatch"
PathLike = Union[str, os.PathLike]


class PromptMismatchError(ValueError):
    """A prompt checkpoint does not belong to the model it is loaded onto."""


class PromptChecksumError(PromptMismatchError):
    """A prompt checkpoint's tensor data differs from what was written (a damaged or altered file)."""


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_PID_IN_TMP = re.compile(r"\.pid(\d+)\.")
_STALE_AFTER_S = 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files that an earlier, killed write of ``path`` left behind: those of a
    process that no longer runs on this machine, or older than an hour."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        m = _PID_IN_TMP.search(tmp.name[len(path.name) + 1:])
        stale = False
        if m is not None:
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                stale = True
            except (PermissionError, OverflowError, OSError):
                pass
        try:
            stale = stale or time.time() - tmp.stat().st_mtime > _STALE_AFTER_S
            if stale:
                tmp.unlink()
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    Temporary files left by an earlier write that was killed are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _backbone_trains_buffers(model: nn.Module) -> bool:
    """Whether the backbone's buffers (BatchNorm statistics) are trained, i.e. it is not frozen."""
    staged = getattr(model, "staged", None)
    return staged is not None and not staged.frozen


def _trainable_backbone_keys(model: nn.Module) -> set:
    backbone = model.backbone
    keys = {n for n, p in backbone.named_parameters() if p.requires_grad}
    if _backbone_trains_buffers(model):
        keys |= {n for n, _ in backbone.named_buffers()}
    return keys


def _frozen_backbone_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    if not hasattr(model, "backbone"):
        return dict(model.state_dict())
    trainable = _trainable_backbone_keys(model)
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


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every state_dict entry of ``model`` except the frozen weights of ``model.backbone``.

    Trainable backbone parameters (and, for a backbone that is not frozen, its buffers) are
    included: a prompt checkpoint of full fine-tuning holds the whole backbone.
    """
    trainable_backbone = {f"backbone.{n}" for n in _trainable_backbone_keys(model)}
    return {
        k: v for k, v in model.state_dict().items() if not k.startswith("backbone.") or k in trainable_backbone
    }


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
) -> Dict[str, Any]:
    """The identity record a prompt checkpoint stores and :func:`load_prompts` checks."""
    return {
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


def _metadata(model: nn.Module, extra: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    from .core import PromptCheckpointable

    if not isinstance(model, PromptCheckpointable):
        raise TypeError(f"save_prompts needs a prompted model (PromptSegmentor, PromptEncoderDecoder: "
                        f"see promptmatch.core.PromptCheckpointable), got {type(model).__name__}")
    meta = {"format_version": FORMAT_VERSION, "library": "promptmatch", "library_version": __version__}
    meta.update(model.describe())
    if extra:
        meta["extra"] = dict(extra)
    return meta


def _normalise_path(path: PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"prompt checkpoints are .safetensors files; got {str(path)!r}")
    return path


def save_prompts(model: nn.Module, path: PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the trainable weights of ``model`` and its identity to ``path`` (``.safetensors``).

    Also writes ``<path without suffix>.json`` with the same metadata. Returns the path.
    Raises :class:`~promptmatch.divergence.NonFiniteError` (and leaves any existing file
    untouched) if a tensor holds NaN or infinite values: a diverged model never replaces
    a good checkpoint.
    """
    from safetensors.torch import save as st_save

    path = _normalise_path(path)
    meta = _metadata(model, extra)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.trainable_state_dict().items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteError(
            f"not writing prompt checkpoint {str(path)!r}: {len(bad)} tensor(s) hold NaN or infinite values "
            f"({', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}); training has diverged. "
            + ("The existing file was left as it was." if path.exists() else "Nothing was written.")
        )
    meta["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    meta["tensor_sha256"] = tensor_checksum(tensors)
    blob = st_save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, blob)
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_prompt_metadata(path: PathLike) -> Dict[str, Any]:
    """The JSON record stored in a prompt checkpoint."""
    from safetensors import safe_open

    path = _normalise_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            all_meta = f.metadata() or {}
            raw = all_meta.get(_META_KEY)
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    if raw is None:
        hint = (": it is a merged segmentor (backbone + prompts); load it with promptmatch.load_segmentor(path)"
                if "promptmatch_segmentor" in all_meta else "")
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
    from safetensors.torch import load_file

    path = _normalise_path(path)
    want = (meta if meta is not None else read_prompt_metadata(path)).get("tensor_sha256")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise PromptChecksumError(f"prompt checkpoint {str(path)!r} is damaged: its tensors cannot be read ({e})") from None
    if want is not None and tensor_checksum(tensors) != want:
        raise PromptChecksumError(
            f"prompt checkpoint {str(path)!r} is damaged or was altered: its tensor data does not match the "
            "checksum written with it. Nothing was loaded; restore the file from a copy or train it again.")
    return tensors


def _differences(want: Mapping[str, Any], got: Mapping[str, Any]) -> List[str]:
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
            if older:  # saved before some fields existed: say how to rebuild the model it came from
                config_diffs.append(
                    f"(the checkpoint was saved before the fields {older} existed; build the model with the "
                    f"settings it was trained with: {getattr(cfg_cls, 'SAVED_BEFORE_HINT', 'its method_config')})")
        diffs.extend(config_diffs)
    for field in ("decoder", "decoder_config"):
        if want[field] != got.get(field):
            diffs.append(f"{field}: checkpoint has {got.get(field)!r}, model has {want[field]!r}")
    return diffs


def load_prompts(model: nn.Module, path: PathLike) -> Dict[str, Any]:
    """Load a prompt checkpoint onto ``model``, refusing one that belongs to another model.

    Checks the backbone identity (architecture and weight fingerprint), classes, method and
    its config, decoder, and every tensor's name and shape before changing any weight:
    on a mismatch, :class:`PromptMismatchError` names each field that differs and the model
    is left untouched. Returns the checkpoint's metadata.
    """
    meta = read_prompt_metadata(path)
    diffs = _differences(model.describe(), meta)
    if diffs:
        raise PromptMismatchError(
            f"prompt checkpoint {str(path)!r} does not match this model:\n  - " + "\n  - ".join(diffs)
        )
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
    return meta


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors`` or a ``torch.save`` file) without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return state
