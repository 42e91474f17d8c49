"""The build-time probe of :class:`~promptmatch.mmseg.PromptEncoderDecoder`: which stage
outputs an mmseg backbone returns as they are, where a neck or head reads them."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..staging import probe_sizes

__all__ = ["probe_outputs"]

_logger = logging.getLogger(__name__)


def probe_outputs(model: nn.Module) -> Tuple[Tuple[int, ...], bool]:
    """:func:`_probe_outputs_at` at the configured probe size, else at the first other size
    the staging probe tries that the backbone takes (a fixed input size is the only one)."""
    st = model.staged
    sizes = probe_sizes(st.stages, st.probe_size, st.fixed_img_size, st.patch_size)
    if st.probe_size in sizes:  # the size the model was built with first
        sizes = [st.probe_size] + [s for s in sizes if s != st.probe_size]
    for n, size in enumerate(sizes):
        try:
            return _probe_outputs_at(model, size)
        except Exception as e:  # noqa: BLE001 - another size may work; the last failure is raised
            if n == len(sizes) - 1:
                raise
            _logger.debug("output probe of %s at %s failed: %r", type(model.backbone).__name__, size, e)
    raise AssertionError("probe_sizes returned no size")  # pragma: no cover


def _probe_outputs_at(model: nn.Module, size: Tuple[int, int]) -> Tuple[Tuple[int, ...], bool]:
    """One pass on a zero image of ``size`` (no autograd): the stages whose output the
    backbone returns as it is (by identity) where a neck or head reads it, and whether it
    returns its last stage's output as it is (else it computes its outputs after the last
    stage, where lean mode, which runs the backbone without autograd, loses the gradient)."""
    param = next(model.method.parameters(), None)
    inputs = torch.zeros(1, 3, *size, device=param.device if param is not None else None)
    seen: Dict[int, List[Any]] = {st.index: [] for st in model.staged.stages}
    # what each stage hands on: as its module returns it (these hooks run after the staging
    # hooks) and as the boundary returned it (NCHW; what a staged timm model returns)
    handles = [model.backbone.get_submodule(st.module).register_forward_hook(
        lambda _m, _a, out, i=st.index: seen[i].append(out)) for st in model.staged.stages]
    method, boundary = model.method, model.method.boundary

    def spy(index: int, features: Tensor, state: Dict[str, Any]) -> Tensor:
        out = boundary(index, features, state)
        seen[index].append(out)
        return out

    method.boundary = spy
    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), model.prompted_session(inputs):
            x = model.backbone(inputs)
    finally:
        model.train(was_training)
        del method.boundary
        for h in handles:
            h.remove()
    outs = list(x) if isinstance(x, (list, tuple)) else [x]
    read_at = _output_positions_read(model, len(outs))

    def returned(i: int, positions: Any) -> bool:
        return any(o is t for o in seen[i] for p, t in enumerate(outs) if p in positions)

    reads = tuple(i for i in sorted(seen) if returned(i, read_at))
    return reads, returned(model.staged.stages[-1].index, range(len(outs)))

def _output_positions_read(model: nn.Module, n: int) -> set:
    """Positions among the backbone's ``n`` outputs that a neck or head reads: all with a
    neck, otherwise the ``in_index`` of the decode and auxiliary heads."""
    if model.with_neck:
        return set(range(n))
    heads = [model.decode_head]
    if model.with_auxiliary_head:
        aux = model.auxiliary_head
        heads += list(aux) if isinstance(aux, nn.ModuleList) else [aux]
    read: set = set()
    for h in heads:
        idx = getattr(h, "in_index", None)
        if idx is None:
            return set(range(n))
        read.update(int(i) % n for i in (idx if isinstance(idx, (list, tuple)) else [idx]))
    return read
