"""Merged segmentor artefacts: the frozen backbone's weights and the prompts/heads in one file.

A prompt checkpoint (:mod:`promptmatch.checkpoint`) holds only the trainable weights of one
dataset and needs the backbone from elsewhere. A *merged* artefact holds every tensor of a
:class:`~promptmatch.PromptSegmentor` (backbone, method, decode head) in one ``.safetensors``
file, with a JSON record in its metadata (under the key ``promptmatch_segmentor``) that says
how to rebuild the model without any download: the timm model name and its keyword
arguments, the stages, the method and its config, the decoder and its config, the classes,
the library versions, and checksums of the tensors.

:func:`load_segmentor` rebuilds the timm model with ``pretrained=False``, attaches the method
and head exactly as recorded, checks that the rebuilt model has exactly the file's tensors
(names, shapes, dtypes) and attributes before copying any weight, and returns a model whose
outputs equal those of the saved one. Writes are atomic (temporary file, then rename).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .checkpoint import (PromptChecksumError, PromptMismatchError, backbone_architecture, check_identity,
                         recorded_normalisation)
from .records import (
    PROMPT_METADATA_KEY,
    SEGMENTOR_METADATA_KEY,
    PathLike,
    check_suffix,
    load_checked_tensors,
    read_metadata,
    refuse_non_finite,
    tensor_checksum,
    write_record,
)
from .version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .segmentor import PromptSegmentor

__all__ = [
    "MergedSegmentorError",
    "MergedChecksumError",
    "save_segmentor",
    "load_segmentor",
    "read_segmentor_metadata",
    "MERGED_FORMAT_VERSION",
]

_logger = logging.getLogger(__name__)

MERGED_FORMAT_VERSION = 1
_FORMAT_NAME = "promptmatch-merged-segmentor"
#: attribute a backbone may carry with the keyword arguments it was created with
_KWARGS_ATTR = "_promptmatch_backbone_kwargs"


class MergedSegmentorError(PromptMismatchError):
    """A merged segmentor file cannot be written or rebuilt: its parts do not match."""


class MergedChecksumError(MergedSegmentorError, PromptChecksumError):
    """A merged segmentor file's tensor data differs from what was written."""


# --------------------------------------------------------------------------- helpers
def _check_path(path: PathLike) -> Path:
    return check_suffix(path, "merged segmentor files")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _simple(value: Any) -> Any:
    """``value`` as a JSON value if it is a plain scalar or a tuple/list of them, else None."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return None


#: backbone attributes that change outputs without changing any tensor shape
_BACKBONE_ATTRS = ("dynamic_img_size", "dynamic_img_pad", "num_classes", "global_pool", "num_prefix_tokens",
                   "no_embed_class", "output_fmt")
_PATCH_EMBED_ATTRS = ("img_size", "patch_size", "strict_img_size", "dynamic_img_pad", "flatten", "output_fmt")


def _backbone_attributes(backbone: nn.Module) -> Dict[str, Any]:
    """Plain attributes of a timm backbone that a rebuilt one must share (dynamic image size, ...)."""
    out: Dict[str, Any] = {}
    for name in _BACKBONE_ATTRS:
        v = _simple(getattr(backbone, name, None))
        if v is not None:
            out[name] = v
    pe = getattr(backbone, "patch_embed", None)
    if isinstance(pe, nn.Module):
        for name in _PATCH_EMBED_ATTRS:
            v = _simple(getattr(pe, name, None))
            if v is not None:
                out[f"patch_embed.{name}"] = v
    return out


def _timm_name(backbone: nn.Module) -> str:
    """``architecture[.tag]`` of a timm backbone; refuses a backbone that is not a timm model."""
    import timm

    arch = backbone_architecture(backbone)
    if not timm.is_model(arch):
        raise MergedSegmentorError(
            f"the backbone ({arch}) is not a timm model, so a merged file could not rebuild it by name. "
            "Save the prompts with save_prompts(model, path) and keep the backbone's weights yourself, "
            "or pass timm_name= the timm model it is.")
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    tag = cfg.get("tag") if isinstance(cfg, Mapping) else None
    return f"{arch}.{tag}" if tag else arch


def _cpu_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every state_dict entry of ``model`` on the CPU, contiguous; tensors sharing memory are copied
    (safetensors refuses shared storage)."""
    seen: set = set()
    out: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr() if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t
    return out


def _float_dtype(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The one floating dtype of ``tensors`` (``"float32"``...), or None if they mix several."""
    dtypes = {str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


# --------------------------------------------------------------------------- rebuild
def _build_skeleton(meta: Mapping[str, Any]) -> "PromptSegmentor":
    """The segmentor a record describes, randomly initialised, built without any download.

    The caller's torch random state is left as it was.
    """
    from .backbones import create_backbone
    from .methods import saved_method_config
    from .segmentor import PromptSegmentor

    bb = meta["backbone"]
    seg_rec = meta["segmentor"]
    with torch.random.fork_rng(devices=[]):
        backbone = create_backbone(bb["timm_name"], pretrained=False, weights=None, **dict(bb.get("kwargs") or {}))
        seg = PromptSegmentor(
            backbone,
            seg_rec["num_classes"],
            method=seg_rec["method"],
            method_cfg=saved_method_config(seg_rec["method"], seg_rec["method_config"]),
            decoder=seg_rec["decoder"],
            decoder_cfg=seg_rec.get("decoder_config"),
            class_names=seg_rec.get("class_names"),
            stage_modules=seg_rec["stage_modules"],
            ignore_index=seg_rec.get("ignore_index", 255),
        )
    dtype = meta.get("float_dtype")
    if dtype and dtype != "float32":
        seg.to(getattr(torch, dtype))
    return seg


def _structure_differences(
    seg: nn.Module, shapes: Mapping[str, Tuple[Tuple[int, ...], str]], meta: Mapping[str, Any]
) -> List[str]:
    """How a (re)built segmentor differs from a record: tensors, shapes, dtypes, stages, attributes."""
    own = {k: (tuple(v.shape), _dtype_name(v)) for k, v in seg.state_dict().items()}
    diffs: List[str] = []
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    if missing:
        diffs.append(f"missing tensors (the model has them, the file does not) {missing[:6]}"
                     + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    if unexpected:
        diffs.append(f"unexpected tensors (the file has them, the model does not) {unexpected[:6]}"
                     + (f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else ""))
    bad_shape = [f"{k}: file {shapes[k][0]}, model {own[k][0]}" for k in sorted(set(own) & set(shapes))
                 if shapes[k][0] != own[k][0]]
    if bad_shape:
        diffs.append("shape mismatches " + "; ".join(bad_shape[:6])
                     + (f" and {len(bad_shape) - 6} more" if len(bad_shape) > 6 else ""))
    bad_dtype = [f"{k}: file {shapes[k][1]}, model {own[k][1]}" for k in sorted(set(own) & set(shapes))
                 if shapes[k][0] == own[k][0] and shapes[k][1] != own[k][1]]
    if bad_dtype:
        diffs.append("dtype mismatches " + "; ".join(bad_dtype[:6]))
    want_stages = meta["segmentor"].get("stages")
    got_stages = [dataclasses.asdict(s) for s in seg.staged.stages]
    if want_stages is not None and want_stages != got_stages:
        diffs.append(f"stages: record has {want_stages}, rebuilt model has {got_stages}")
    want_attrs = meta["backbone"].get("attributes") or {}
    got_attrs = _backbone_attributes(seg.backbone)
    for k in sorted(set(want_attrs) | set(got_attrs)):
        if want_attrs.get(k) != got_attrs.get(k):
            diffs.append(f"backbone attribute {k}: record has {want_attrs.get(k)!r}, rebuilt model has "
                         f"{got_attrs.get(k)!r}")
    return diffs


# --------------------------------------------------------------------------- save
def save_segmentor(
    model: nn.Module,
    path: PathLike,
    *,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    timm_name: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
    verify: bool = True,
    write_json: bool = True,
) -> Path:
    """Write every tensor of a :class:`~promptmatch.PromptSegmentor` and how to rebuild it to ``path``.

    Args:
        model: a segmentor whose backbone is a timm model.
        path: the ``.safetensors`` file to write (atomically: a crash leaves the old file or the new one).
        backbone_kwargs: the keyword arguments its timm model was created with (``depth``,
            ``embed_dim``, ``img_size``...), as given to ``create_segmentor(backbone_kwargs=...)``.
            Default: those recorded on the backbone by promptmatch if any, else none (timm's defaults).
        timm_name: the timm model name (default: the backbone's ``pretrained_cfg`` architecture and tag).
        extra: JSON-serialisable information stored under ``"extra"``.
        verify: rebuild the model from the record (randomly initialised, no download) and refuse to
            write a file that could not be loaded back: tensors, shapes, stages or backbone
            attributes that differ (typically missing ``backbone_kwargs``).
        write_json: also write ``<path without suffix>.json`` with the same record, for people.

    Raises :class:`MergedSegmentorError` for a model that cannot be rebuilt from a record and
    :class:`~promptmatch.NonFiniteError` for one holding NaN/inf; nothing is written then.
    Returns the path.
    """
    from .segmentor import PromptSegmentor

    t0 = time.perf_counter()
    path = _check_path(path)
    if not isinstance(model, PromptSegmentor):
        raise TypeError(f"save_segmentor needs a PromptSegmentor, got {type(model).__name__}")
    backbone = model.backbone
    if backbone_kwargs is None:
        backbone_kwargs = getattr(backbone, _KWARGS_ATTR, None) or {}
    backbone_kwargs = dict(backbone_kwargs)
    if not _jsonable(backbone_kwargs):
        raise TypeError(f"backbone_kwargs must be JSON-serialisable, got {backbone_kwargs!r}")
    if extra is not None and not _jsonable(dict(extra)):
        raise TypeError("extra must be JSON-serialisable")
    if timm_name is None:
        timm_name = _timm_name(backbone)
    import timm

    identity = model.describe()
    tensors = _cpu_tensors(model)
    refuse_non_finite(tensors, path, "merged segmentor")
    prompt_keys = sorted(model.trainable_state_dict())
    meta: Dict[str, Any] = {
        "format": _FORMAT_NAME,
        "format_version": MERGED_FORMAT_VERSION,
        "library": "promptmatch",
        "library_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "backbone": {
            "timm_name": timm_name,
            "architecture": identity["backbone"]["architecture"],
            "kwargs": backbone_kwargs,
            "attributes": _backbone_attributes(backbone),
            "num_stages": len(model.staged.stages),
            "stage_modules": [s.module for s in model.staged.stages],
            "fingerprint": identity["backbone"]["fingerprint"],
        },
        "segmentor": {
            "method": identity["method"],
            "method_config": identity["method_config"],
            "decoder": identity["decoder"],
            "decoder_config": identity["decoder_config"],
            "num_classes": identity["num_classes"],
            "class_names": identity["class_names"],
            "ignore_index": identity["ignore_index"],
            "stage_modules": [s.module for s in model.staged.stages],
            "stages": [dataclasses.asdict(s) for s in model.staged.stages],
        },
        "identity": identity,
        "float_dtype": _float_dtype(tensors),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "dtypes": {k: _dtype_name(v) for k, v in tensors.items()},
        "prompt_tensors": prompt_keys,
        "tensor_sha256": tensor_checksum(tensors),
        "prompt_tensor_sha256": tensor_checksum({k: tensors[k] for k in prompt_keys}),
    }
    if extra:
        meta["extra"] = dict(extra)
    if verify:
        shapes = {k: (tuple(v.shape), _dtype_name(v)) for k, v in tensors.items()}
        try:
            skeleton = _build_skeleton(meta)
        except Exception as e:
            raise MergedSegmentorError(
                f"not writing merged segmentor {str(path)!r}: the model cannot be rebuilt from its record "
                f"(timm model {timm_name!r}, kwargs {backbone_kwargs}): {type(e).__name__}: {e}") from e
        diffs = _structure_differences(skeleton, shapes, meta)
        del skeleton
        if diffs:
            raise MergedSegmentorError(
                f"not writing merged segmentor {str(path)!r}: a {timm_name!r} rebuilt with backbone_kwargs="
                f"{backbone_kwargs} does not match this model, so the file could not be loaded back. Pass "
                "save_segmentor(..., backbone_kwargs=...) with the keyword arguments the backbone was "
                "created with (depth, embed_dim, img_size, ...):\n  - " + "\n  - ".join(diffs))
    size = write_record(path, tensors, SEGMENTOR_METADATA_KEY, meta, write_json=write_json)
    _logger.info("wrote merged segmentor %s (%s, %s, %d tensors, %.1f MB) in %.2fs", path, timm_name,
                 identity["method"], len(tensors), size / 2**20, time.perf_counter() - t0)
    return path


# --------------------------------------------------------------------------- load
def read_segmentor_metadata(path: PathLike) -> Dict[str, Any]:
    """The JSON record stored in a merged segmentor file.

    Raises :class:`MergedSegmentorError` for a prompt checkpoint (trainable weights only) or
    any other safetensors file, and for a format newer than this promptmatch reads.
    """
    path = _check_path(path)
    metadata = read_metadata(path, "merged segmentor file")
    raw = metadata.get(SEGMENTOR_METADATA_KEY)
    if raw is None:
        if PROMPT_METADATA_KEY in metadata:
            try:
                rec = json.loads(metadata[PROMPT_METADATA_KEY])
                hint = (f" (method {rec.get('method')!r}, backbone {rec.get('backbone', {}).get('architecture')!r}, "
                        f"{rec.get('num_classes')} classes)")
            except (ValueError, AttributeError):
                hint = ""
            raise MergedSegmentorError(
                f"{str(path)!r} is a prompt checkpoint{hint}, not a merged segmentor: it holds the trainable "
                "weights only, without the backbone. Build the model with its backbone and use load_prompts: "
                "model = create_segmentor(<backbone>, <method>, <num_classes>, weights=<backbone weights>); "
                f"load_prompts(model, {str(path)!r})")
        raise MergedSegmentorError(f"{str(path)!r} is a safetensors file but not a promptmatch merged segmentor")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise MergedSegmentorError(f"{str(path)!r}: its promptmatch record is not valid JSON ({e})") from None
    if meta.get("format") != _FORMAT_NAME:
        raise MergedSegmentorError(f"{str(path)!r}: unknown record format {meta.get('format')!r}")
    if meta.get("format_version", 0) > MERGED_FORMAT_VERSION:
        raise MergedSegmentorError(
            f"{str(path)!r} uses merged format {meta['format_version']}; this promptmatch ({__version__}) "
            f"reads up to {MERGED_FORMAT_VERSION}: upgrade promptmatch")
    return meta


def load_segmentor(path: PathLike, device: Union[str, torch.device] = "cpu") -> "PromptSegmentor":
    """Rebuild the :class:`~promptmatch.PromptSegmentor` stored in a merged file, offline.

    The timm model is created with ``pretrained=False`` (no download, whatever the environment
    says) and every weight comes from the file. Before any weight is copied, the tensor data is
    checked against the stored checksum (:class:`MergedChecksumError`) and the rebuilt model's
    tensors (names, shapes, dtypes), stages and backbone attributes against the file's
    (:class:`MergedSegmentorError` naming what differs); after loading, the model's identity
    (backbone fingerprint, method, decoder, classes) is checked against the record. On any
    failure nothing is returned. The model is returned on ``device`` in eval mode.
    """
    t0 = time.perf_counter()
    path = _check_path(path)
    meta = read_segmentor_metadata(path)
    tensors = load_checked_tensors(path, meta.get("tensor_sha256"), error=MergedChecksumError,
                                   kind="merged segmentor", remedy="write it again", require_checksum=True)
    recorded = meta.get("tensors") or {}
    listed = {k: tuple(v) for k, v in recorded.items()}
    actual = {k: tuple(v.shape) for k, v in tensors.items()}
    if listed != actual:
        only_file = sorted(set(actual) - set(listed))
        only_rec = sorted(set(listed) - set(actual))
        shape = sorted(k for k in set(actual) & set(listed) if actual[k] != listed[k])
        raise MergedSegmentorError(
            f"merged segmentor {str(path)!r}: its tensors differ from its own record (tensors not in the record "
            f"{only_file[:6]}, recorded tensors missing {only_rec[:6]}, other shapes {shape[:6]}); nothing was loaded")
    if meta.get("timm_version") != _timm_version():
        _logger.warning("%s was written with timm %s; this is timm %s: the rebuilt model is checked tensor by "
                        "tensor, but outputs may differ if timm changed the model's code", path,
                        meta.get("timm_version"), _timm_version())
    try:
        seg = _build_skeleton(meta)
    except Exception as e:
        raise MergedSegmentorError(
            f"cannot rebuild the segmentor of {str(path)!r} (timm model {meta['backbone'].get('timm_name')!r}, "
            f"kwargs {meta['backbone'].get('kwargs')}, method {meta['segmentor'].get('method')!r}; written with "
            f"timm {meta.get('timm_version')}, this is timm {_timm_version()}): {type(e).__name__}: {e}") from e
    shapes = {k: (tuple(v.shape), _dtype_name(v)) for k, v in tensors.items()}
    diffs = _structure_differences(seg, shapes, meta)
    if diffs:
        raise MergedSegmentorError(
            f"merged segmentor {str(path)!r} does not match the model its record describes "
            f"({meta['backbone'].get('timm_name')!r}, method {meta['segmentor'].get('method')!r}); nothing was "
            "loaded:\n  - " + "\n  - ".join(diffs))
    seg.load_state_dict(tensors, strict=True)
    identity = meta.get("identity")
    if identity is not None:
        check_identity(seg.describe(), identity, f"merged segmentor {str(path)!r}: the loaded model's identity "
                       "differs from its record; nothing was returned", error=MergedSegmentorError)
    seg.input_normalisation = recorded_normalisation(identity or {})
    seg = seg.to(device).eval()
    _logger.info("loaded merged segmentor %s (%s, %s) in %.2fs", path, meta["backbone"]["timm_name"],
                 meta["segmentor"]["method"], time.perf_counter() - t0)
    return seg


def _timm_version() -> str:
    import timm

    return timm.__version__
