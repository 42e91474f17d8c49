"""Stage boundaries as data: where a backbone's stages end, read from timm's ``feature_info``
or from module names given by hand, without running the model."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Stage", "find_stages", "group_blocks", "not_one_tensor_error"]


@dataclass(frozen=True)
class Stage:
    """One stage of a staged backbone; its boundary is the output of ``module``.

    ``channels`` and ``reduction`` (the stride) are 0 while unknown, until a probe finds them.
    """

    index: int
    module: str
    channels: int
    reduction: int


def group_blocks(num_blocks: int, num_stages: Optional[int] = None) -> List[int]:
    """Indices of the blocks that end ``num_stages`` equal groups of ``num_blocks`` blocks.

    A plain ViT has no stages of its own: its blocks are split into groups (default
    ``min(4, num_blocks)``), the earlier groups rounded up, the last ending at the last block.
    """
    n = num_stages or min(4, num_blocks)
    if not 1 <= n <= num_blocks:
        raise ValueError(f"num_stages must be in [1, {num_blocks}] for this model, got {n}")
    return [-(-(i + 1) * num_blocks // n) - 1 for i in range(n)]


def find_stages(
    model: nn.Module,
    stage_modules: Optional[Sequence[str]] = None,
    num_stages: Optional[int] = None,
    min_reduction: int = 4,
) -> Tuple[Stage, ...]:
    """The stages of ``model``, from ``stage_modules`` or else from its ``feature_info``.

    Channels and strides come from ``feature_info`` where it lists the module, else they are 0
    (unknown). Plain ViTs (every ``feature_info`` entry at one stride) get ``num_stages`` groups of
    blocks; hierarchical backbones get the entries with a stride of at least ``min_reduction``.
    """
    by_module = _feature_info_by_module(model)
    if stage_modules is not None:
        names = list(stage_modules)
        if not names:
            raise ValueError("stage_modules is empty: give at least one module name")
        missing = [n for n in names if not _has_submodule(model, n)]
        if missing:
            raise ValueError(
                f"stage_modules {missing} are not submodules of {type(model).__name__}; "
                "use names from model.named_modules()"
            )
        return tuple(
            Stage(i, n, int(by_module.get(n, {}).get("num_chs", 0)), int(by_module.get(n, {}).get("reduction", 0)))
            for i, n in enumerate(names)
        )

    if not by_module:
        raise ValueError(
            f"{type(model).__name__} has no usable `feature_info` (a list of dicts with "
            "'module', 'num_chs' and 'reduction'), so its stages cannot be found. Pass the "
            "names of the modules that end each stage explicitly, e.g. "
            "stage_modules=['layer1', 'layer2', 'layer3', 'layer4']"
        )
    entries = [f for f in by_module.values() if _has_submodule(model, f["module"])]
    if not entries:
        raise ValueError(
            f"the modules named in {type(model).__name__}.feature_info do not exist in the model "
            "(a features_only wrapper renames them); pass the plain model or give stage_modules"
        )
    if len({int(f["reduction"]) for f in entries}) == 1 and len(entries) > 1:
        # plain (isotropic) ViT: every block is a boundary at the same stride
        entries = [entries[e] for e in group_blocks(len(entries), num_stages)]
    else:
        if num_stages is not None:
            raise ValueError(
                "num_stages only applies to plain ViTs whose blocks all share one stride; "
                "for hierarchical backbones pass stage_modules to choose boundaries"
            )
        entries = [f for f in entries if int(f["reduction"]) >= min_reduction] or entries[-1:]
    return tuple(Stage(i, f["module"], int(f["num_chs"]), int(f["reduction"])) for i, f in enumerate(entries))


def not_one_tensor_error(model: nn.Module, name: str, out: object) -> ValueError:
    """The error for a stage module ``name`` whose output ``out`` is not one tensor."""
    try:
        kind = type(model.get_submodule(name)).__name__
    except AttributeError:  # pragma: no cover - names are checked before
        kind = "module"
    return ValueError(
        f"stage module {name!r} ({kind} in {type(model).__name__}) returns {_describe_output(out)}, not one "
        "tensor, so it cannot end a stage: the matcher replaces a stage's output tensor. Give "
        "stage_modules=[...] naming modules that each return one tensor (e.g. one module per branch "
        f"inside {name!r}; see model.named_modules()). Multi-branch backbones get such stages by default "
        "(stage_modules=None) for timm's HighResolutionNet (its incre_modules) and mmseg's HRNet (the "
        "branches of its last module)."
    )


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _feature_info_by_module(model: nn.Module) -> Dict[str, dict]:
    """``feature_info`` entries by the name of the module that produces each feature."""
    info = getattr(model, "feature_info", None)
    by_module: Dict[str, dict] = {}
    if isinstance(info, (list, tuple)) and all(isinstance(f, dict) and "module" in f for f in info):
        by_module = {f["module"]: f for f in info}
    elif info is not None and hasattr(info, "info"):  # timm FeatureInfo object
        by_module = {f["module"]: f for f in info.info}
    aliases = _feature_module_aliases(model) if by_module else {}
    if aliases:
        by_module = {aliases.get(k, k): dict(f, module=aliases.get(k, k)) for k, f in by_module.items()}
    return by_module


def _feature_module_aliases(model: nn.Module) -> Dict[str, str]:
    """``feature_info`` module names that do not name the module producing the feature -> the one that does.

    timm's HighResolutionNet lists its four branch features as 'stage1'..'stage4' (taken after the
    channel-increasing ``incre_modules``); its modules 'stage2'..'stage4' are the multi-branch stages
    and return lists. The features are the outputs of ``incre_modules.<i>``, one tensor each.
    """
    hrnet = sys.modules.get("timm.models.hrnet")  # imported already if the model is one
    cls = getattr(hrnet, "HighResolutionNet", None)
    if cls is None:
        return {}
    aliases: Dict[str, str] = {}
    for prefix, mod in model.named_modules():
        incre = getattr(mod, "incre_modules", None)
        if isinstance(mod, cls) and isinstance(incre, nn.ModuleList):
            p = f"{prefix}." if prefix else ""
            for i in range(len(incre)):
                aliases[f"{p}stage{i + 1}"] = f"{p}incre_modules.{i}"
    return aliases


def _describe_output(out: object) -> str:
    """What a module returned, in words: 'a list of 2 tensors', 'a dict with keys [...]', 'None'."""
    if out is None:
        return "None"
    if isinstance(out, (list, tuple)):
        kind = type(out).__name__
        if out and all(isinstance(o, torch.Tensor) for o in out):
            return f"a {kind} of {len(out)} tensor{'s' if len(out) != 1 else ''}"
        items = ", ".join(type(o).__name__ for o in out[:4]) + (", ..." if len(out) > 4 else "")
        return f"a {kind} of {len(out)} item{'s' if len(out) != 1 else ''} ({items})"
    if isinstance(out, dict):
        return f"a {type(out).__name__} with keys {list(out)[:6]}"
    return f"a {type(out).__name__}"
