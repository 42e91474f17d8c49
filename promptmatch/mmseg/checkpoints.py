"""Prompts out of mmengine Runner checkpoints (``iter_<n>.pth``), for runs made with mmseg's
own ``tools/train.py``, which writes no prompt checkpoint.

A Runner checkpoint pickles Python objects besides the weights (the message hub's history,
numpy arrays, the optimiser state). :func:`read_runner_state_dict` reads it without running
any of that code: tensors are rebuilt by torch's own allow-list of safe globals, every other
object becomes an inert placeholder, and only ``state_dict`` is kept.

A prompted model publishes its identity (the record a prompt checkpoint stores: backbone
fingerprint, method and its config, heads, classes) in mmengine's message hub, so every Runner
checkpoint of the run carries it (in the message hub's runtime information, which the Runner
saves) and a model built with other settings is refused even where the tensors happen to fit
(e.g. SPM with another ``prompt_gain``). ``PromptCheckpointHook`` publishes it before training
into its Runner's hub, and refuses to resume from a checkpoint of another model; without the
hook (mmseg's own ``train.py`` on the one-line config) the model publishes it at its first
training step into the current hub (the newest Runner's). Checkpoints written before
2026-12-07 carry none and are checked by their tensors alone.
"""
from __future__ import annotations

import json
import os
import pickle
import types
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..checkpoint import PromptMismatchError, check_identity, load_prompts, save_prompts
from ..core import trainable_state_dict

__all__ = ["read_runner_state_dict", "read_runner_identity", "load_prompts_or_runner_checkpoint", "extract_prompts",
           "publish_identity"]

IDENTITY_KEY = "promptmatch_identity"  # the message hub's runtime-information key

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


def _read_runner_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
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
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    hub = ckpt.get("message_hub")
    info = hub.get("runtime_info") if isinstance(hub, dict) else None
    raw = info.get(IDENTITY_KEY) if isinstance(info, dict) else None
    identity = None
    if isinstance(raw, str):
        try:
            identity = json.loads(raw)
        except ValueError:
            raise ValueError(f"{str(path)!r}: its promptmatch identity record is not valid JSON (the file is "
                             "damaged)") from None
    return state, identity


def read_runner_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The model weights (``state_dict``) of an mmengine Runner checkpoint, read without
    executing pickled code."""
    return _read_runner_checkpoint(path)[0]


def read_runner_identity(path: PathLike) -> Optional[Dict[str, Any]]:
    """The identity record the prompted model of a Runner checkpoint's run published (as in a
    prompt checkpoint's metadata), or None for checkpoints without one (written before
    2026-12-07, or of a model that is not prompted)."""
    return _read_runner_checkpoint(path)[1]


def publish_identity(model: nn.Module, hub: Any = None, check: bool = False) -> bool:
    """Put ``model.describe()`` into mmengine's message hub ``hub`` (default: the current one),
    which every Runner checkpoint saves, so :func:`load_prompts_or_runner_checkpoint` can
    refuse a model built with other settings. With ``check`` (the hub is the training
    Runner's, after it resumed), an identity already there that differs from the model's
    (a resumed checkpoint of another model) raises :class:`PromptMismatchError`. True once
    published."""
    from mmengine.logging import MessageHub

    hub = hub if hub is not None else MessageHub.get_current_instance()
    mine = model.describe()
    old = hub.get_info(IDENTITY_KEY) if check else None
    try:
        previous = json.loads(old) if isinstance(old, str) else None
    except ValueError:
        previous = None
    if previous is not None:
        check_identity(mine, previous, "the checkpoint this run resumed from belongs to another model")
    hub.update_info(IDENTITY_KEY, json.dumps(mine), resumed=True)
    return True


def _load_runner_checkpoint(model: nn.Module, path: PathLike) -> Dict[str, Any]:
    state, identity = _read_runner_checkpoint(path)
    if identity is not None and hasattr(model, "describe"):
        check_identity(model.describe(), identity, f"Runner checkpoint {str(path)!r} does not match this model")
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
        if identity is None and getattr(model, "method_name", None) == "spm" and (missing or unexpected):
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
