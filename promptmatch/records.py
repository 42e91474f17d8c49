"""Safetensors records: the one file layer under prompt checkpoints and merged segmentor files.

A record is a ``.safetensors`` file whose metadata holds a JSON document under one key
(:data:`PROMPT_METADATA_KEY` for prompt checkpoints, :data:`SEGMENTOR_METADATA_KEY` for merged
segmentor files) with a checksum of the tensors. This module writes records atomically (with an
optional ``.json`` copy of the document; :mod:`promptmatch._atomic`: new files get the mode the
umask gives, 0644 typically), reads their metadata, loads their tensors checked
against the checksum, refuses tensors holding NaN/inf, and reads plain weights files without
unpickling code. It knows nothing of models; the error classes are the callers'.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Type, Union

import torch

from ._atomic import atomic_write_bytes
from .divergence import NonFiniteError, non_finite_tensors

__all__ = [
    "PROMPT_METADATA_KEY",
    "SEGMENTOR_METADATA_KEY",
    "PathLike",
    "tensor_checksum",
    "atomic_write_bytes",
    "check_suffix",
    "read_metadata",
    "load_checked_tensors",
    "refuse_non_finite",
    "write_record",
    "read_state_dict",
]

#: safetensors metadata key of a prompt checkpoint's JSON record
PROMPT_METADATA_KEY = "promptmatch"
#: safetensors metadata key of a merged segmentor file's JSON record
SEGMENTOR_METADATA_KEY = "promptmatch_segmentor"

PathLike = Union[str, os.PathLike]


def tensor_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_suffix(path: PathLike, kind: str) -> Path:
    """``path`` as a Path; ``ValueError`` unless it ends in ``.safetensors``.

    ``kind``: what the files are called in the message, plural (``"prompt checkpoints"``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{kind} are .safetensors files; got {str(path)!r}")
    return path


def read_metadata(path: Path, kind: str) -> Dict[str, str]:
    """The safetensors metadata of ``path`` (empty if it has none).

    ``FileNotFoundError`` if there is no such file (``kind``: what it should be, for the
    message), ``ValueError`` if it is not a readable safetensors file.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(path)!r} does not exist")
    # safetensors raises its own exception types (and OSError) for files it cannot parse
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None


def load_checked_tensors(
    path: Path,
    want: Optional[str],
    *,
    error: Type[Exception],
    kind: str,
    remedy: str,
    require_checksum: bool = False,
) -> Dict[str, torch.Tensor]:
    """The tensors of the record at ``path``, checked against the checksum ``want`` stored in it.

    Raises ``error`` if the tensors cannot be read or differ from the checksum (also when the
    record has none and ``require_checksum``). ``kind`` names the file in messages (``"prompt
    checkpoint"``), ``remedy`` ends the message of a mismatch (``"train it again"``).
    """
    from safetensors.torch import load_file

    # any failure to parse the tensor data means a damaged file, whatever safetensors raises
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise error(f"{kind} {str(path)!r} is damaged: its tensors cannot be read ({e})") from None
    if (want is None and require_checksum) or (want is not None and tensor_checksum(tensors) != want):
        raise error(
            f"{kind} {str(path)!r} is damaged or was altered: its tensor data does not match the "
            f"checksum written with it. Nothing was loaded; restore the file from a copy or {remedy}.")
    return tensors


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], path: Path, kind: str, why: str = "") -> None:
    """:class:`~promptmatch.divergence.NonFiniteError` if a tensor holds NaN or infinite values.

    The message says that nothing at ``path`` was (over)written; ``kind`` names the file
    (``"prompt checkpoint"``) and ``why`` (e.g. ``"; training has diverged"``) follows the list.
    """
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteError(
            f"not writing {kind} {str(path)!r}: {len(bad)} tensor(s) hold NaN or infinite values "
            f"({', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}){why}. "
            + ("The existing file was left as it was." if path.exists() else "Nothing was written."))


def write_record(
    path: Path, tensors: Mapping[str, torch.Tensor], key: str, record: Mapping[str, Any], *, write_json: bool = True
) -> int:
    """Write ``tensors`` with ``record`` (as sorted JSON under metadata ``key``) to ``path``,
    atomically, and the record to ``<path without suffix>.json`` if ``write_json``.

    Returns the size of the safetensors file in bytes.
    """
    from safetensors.torch import save as st_save

    blob = st_save(dict(tensors), metadata={key: json.dumps(record, sort_keys=True)})
    atomic_write_bytes(path, blob)
    if write_json:
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return len(blob)


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
