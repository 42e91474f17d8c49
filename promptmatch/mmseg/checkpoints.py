"""Prompts out of mmengine Runner checkpoints (``iter_<n>.pth``), for runs made with mmseg's
own ``tools/train.py``, which writes no prompt checkpoint.

A Runner checkpoint pickles Python objects besides the weights (the message hub's history,
numpy arrays, the optimiser state). :func:`read_runner_state_dict` reads it without running
any of that code: tensors are rebuilt by torch's own allow-list of safe globals, every other
object becomes an inert placeholder, and only ``state_dict`` is kept.
"""
from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

from ..checkpoint import PromptMismatchError, load_prompts, save_prompts
from ..core import trainable_state_dict

__all__ = ["read_runner_state_dict", "load_prompts_or_runner_checkpoint", "extract_prompts"]

PathLike = Union[str, os.PathLike]


class _Inert:
    """Stands in for an object of a class that is not unpickled (nothing of it runs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _restricted_pickle_module() -> types.ModuleType:
    from torch import _weights_only_unpickler

    allowed = _weights_only_unpickler._get_allowed_globals()
    stubs: Dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            if key not in stubs:
                stubs[key] = type(f"Unloaded[{key}]", (_Inert,), {})
            return stubs[key]

    mod = types.ModuleType("promptmatch_restricted_pickle")
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    mod.__name__ = "promptmatch_restricted_pickle"
    return mod


def read_runner_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The model weights (``state_dict``) of an mmengine Runner checkpoint, read without
    executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable torch checkpoint: {e}") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} holds no model state_dict (is it an mmengine Runner checkpoint?)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_runner_checkpoint(model: nn.Module, path: PathLike) -> Dict[str, Any]:
    state = read_runner_state_dict(path)
    own = model.state_dict()
    trainable = set(trainable_state_dict(model))
    frozen = [k for k in own if k not in trainable]
    problems = []
    missing = sorted(k for k in own if k not in state)
    if missing:
        problems.append(f"{len(missing)} tensors of this model are missing, e.g. {missing[:4]}")
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not in this model, e.g. {unexpected[:4]}")
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        problems.append(f"shapes differ for {shapes[:4]}")
    if not problems:
        changed = [k for k in frozen if not torch.equal(state[k].to(own[k].dtype), own[k].cpu())]
        if changed:
            problems.append(f"its frozen backbone differs from the config's pretrained backbone in {len(changed)} "
                            f"tensors (e.g. {changed[:3]}): it was trained on other backbone weights")
    if problems:
        if getattr(model, "method_name", None) == "spm" and (missing or unexpected):
            problems.append("a Runner checkpoint of an SPM run made before 2026-12-06 with SPM's default settings "
                            "holds SPM v3: set model.method_cfg=promptmatch.SPMConfig.v3().to_dict() in the config")
        raise PromptMismatchError(f"Runner checkpoint {str(path)!r} does not match this model: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in trainable}, strict=False)
    return {"source": str(path), "kind": "mmengine Runner checkpoint", "tensors": sorted(trainable)}


def load_prompts_or_runner_checkpoint(model: nn.Module, path: PathLike) -> Dict[str, Any]:
    """Load the trainable weights of ``model`` from a prompt checkpoint (``.safetensors``) or
    from an mmengine Runner checkpoint (``.pth``, e.g. written by mmseg's own train script).

    The frozen backbone must already hold its pretrained weights (``model.init_weights()``).
    A ``.pth`` whose frozen backbone tensors differ from the model's (another backbone, other
    pretrained weights) or whose tensors do not fit is refused with
    :class:`~promptmatch.PromptMismatchError` before any weight changes.
    """
    if str(path).endswith(".safetensors"):
        return load_prompts(model, path)
    return _load_runner_checkpoint(model, path)


def extract_prompts(model: nn.Module, runner_checkpoint: PathLike, out: PathLike) -> Path:
    """Write the prompt checkpoint (``out``, ``.safetensors``) of ``model`` as trained in
    ``runner_checkpoint``; ``model`` is built from the run's config with its pretrained
    backbone loaded. Refuses a checkpoint whose backbone does not match."""
    _load_runner_checkpoint(model, runner_checkpoint)
    return save_prompts(model, out, extra={"extracted_from": str(runner_checkpoint)})
