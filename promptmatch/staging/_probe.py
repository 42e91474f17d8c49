"""The build-time probe: one no-grad forward pass that checks what each stage module returns and
finds the channels and strides of stages named by hand."""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ._hooks import StopForward, run_to_last_stage
from ._layout import map_dims, map_layout, token_stride
from ._stages import Stage, not_one_tensor_error

__all__ = ["probe_stages", "probe_sizes", "autograd_leaves"]

_logger = logging.getLogger(__name__)


def probe_stages(
    model: nn.Module,
    stages: Sequence[Stage],
    probe_size: Tuple[int, int],
    fixed_img_size: Optional[Tuple[int, int]] = None,
    patch_size: Optional[Tuple[int, int]] = None,
    native_fmt: str = "NCHW",
) -> Tuple[Stage, ...]:
    """``stages`` checked by a forward pass of ``model``, with unknown (0) channels and strides found.

    A stage module that returns anything but one 3-d or 4-d tensor (a list of branch maps, a
    tuple, a dict) is refused with a :class:`ValueError` that says what it returned and what to
    do, when the model is built rather than at its first forward. If some channels or strides
    are unknown, the pass runs at ``fixed_img_size`` (if the model takes only that) or
    ``probe_size`` and must succeed. Otherwise it runs on a small input first (then on
    ``probe_size``), and a pass that fails for another reason (an input size this model cannot
    take) is not an error; the stages seen before it are checked.
    """
    strict = any(s.channels <= 0 or s.reduction <= 0 for s in stages)
    sizes = _probe_sizes(stages, strict, probe_size, fixed_img_size, patch_size)
    outs = _stage_outputs(model, stages, sizes, strict)
    if not strict:
        return tuple(stages)
    size = fixed_img_size or probe_size
    probed = []
    for s in stages:
        out = outs[s.module]
        assert isinstance(out, torch.Tensor)
        if out.ndim == 4:
            channels, height, _ = map_dims(out, map_layout(out, 0, native_fmt))
            reduction = max(1, round(size[0] / height))
        else:
            channels, reduction = out.shape[2], token_stride(out.shape[1], size)
        probed.append(Stage(s.index, s.module, int(channels), int(reduction)))
    return tuple(probed)


def _probe_sizes(
    stages: Sequence[Stage],
    strict: bool,
    probe_size: Tuple[int, int],
    fixed_img_size: Optional[Tuple[int, int]],
    patch_size: Optional[Tuple[int, int]],
) -> List[Tuple[int, int]]:
    """Input sizes the probe tries, in order."""
    if fixed_img_size is not None:
        return [fixed_img_size]
    if strict:
        return [probe_size]
    # strides are known: a small input (a multiple of the largest stride and of the patch)
    # is enough to see what each stage module returns, and costs little
    step = max(s.reduction for s in stages)
    if patch_size is not None:
        step = math.lcm(step, *patch_size)
    side = step * max(2, -(-64 // step))  # at least 64 px and two cells of the largest stride
    small = (side, side)
    return [small] if small == probe_size else [small, probe_size]


def probe_sizes(
    stages: Sequence[Stage],
    probe_size: Tuple[int, int],
    fixed_img_size: Optional[Tuple[int, int]] = None,
    patch_size: Optional[Tuple[int, int]] = None,
) -> List[Tuple[int, int]]:
    """The input sizes a probe of stages with known strides tries, smallest first."""
    return _probe_sizes(stages, False, probe_size, fixed_img_size, patch_size)


def autograd_leaves(outputs: Iterable[torch.Tensor]) -> Set[int]:
    """``id()`` of every leaf tensor that requires grad and that ``outputs`` depend on through
    autograd (what a backward pass from them would give a gradient), found by walking the
    graph without running it."""
    outs = [t for t in outputs if isinstance(t, torch.Tensor)]
    leaves = {id(t) for t in outs if t.requires_grad and t.grad_fn is None}  # outputs that are leaves
    seen: Dict[int, object] = {}  # holds the nodes, so that no id is reused while walking
    stack = [t.grad_fn for t in outs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        var = getattr(node, "variable", None)  # AccumulateGrad: the leaf it feeds
        if isinstance(var, torch.Tensor):
            leaves.add(id(var))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return leaves


def _stage_outputs(
    model: nn.Module, stages: Sequence[Stage], sizes: Sequence[Tuple[int, int]], strict: bool
) -> Dict[str, object]:
    """What each stage module returns in a no-grad forward pass at the first of ``sizes`` that works."""
    outs: Dict[str, object] = {}
    wanted = {s.module for s in stages}

    def record(name: str, module: nn.Module, args: object, output: object) -> None:
        outs.setdefault(name, output)
        if len(outs) == len(wanted):
            raise StopForward()

    hooks = [model.get_submodule(n).register_forward_hook(partial(record, n)) for n in wanted]
    was_training = model.training
    model.eval()
    failure: Optional[BaseException] = None
    try:
        ref = next(iter(model.parameters()), None)
        fwd = getattr(model, "forward_features", model)
        for size in sizes:
            outs.clear()
            failure = None
            x = torch.zeros(1, 3, *size) if ref is None else torch.zeros(1, 3, *size, device=ref.device, dtype=ref.dtype)
            try:
                with torch.no_grad():
                    run_to_last_stage(fwd, x)
            except Exception as e:  # checked below: a multi-output stage seen before it is the clearer error
                failure = e
                _logger.debug("probe forward pass of %s at %s failed: %r", type(model).__name__, size, e)
            if failure is None or any(not isinstance(o, torch.Tensor) for o in outs.values()):
                break
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for s in stages:
        if s.module not in outs:
            continue
        out = outs[s.module]
        if not isinstance(out, torch.Tensor):
            raise not_one_tensor_error(model, s.module, out)
        if out.ndim not in (3, 4):
            raise ValueError(
                f"stage module {s.module!r} returns a {out.ndim}-d tensor {tuple(out.shape)}; a stage must "
                "end at a module returning tokens (N, L, C) or a map (N, C, H, W) / (N, H, W, C)"
            )
    if failure is not None:
        if strict:
            raise failure
        return outs
    missing = [s.module for s in stages if s.module not in outs]
    if missing:
        raise ValueError(
            f"a forward pass of {type(model).__name__} never runs the stage modules {missing}; "
            "name modules that its forward_features (or forward) calls"
        )
    return outs
