"""``ssf``: Scaling & Shifting your Features (Lian et al., "Scaling & Shifting Your Features: A
New Baseline for Efficient Model Tuning", NeurIPS 2022).

After every operation of the frozen backbone (linear and convolution layers, normalisation
layers) a learnable per-channel scale ``gamma`` (initialised to 1) and shift ``beta``
(initialised to 0) act on its output::

    y = op(x)  ->  gamma * y + beta

so at initialisation the model computes exactly what the frozen backbone computes. In a ViT
that is after the patch embedding, ``qkv``, the attention ``proj``, ``fc1``, ``fc2`` and both
norms of every block; in a CNN after every convolution and BatchNorm (the stem included);
in a Swin, ConvNeXt or PVTv2 after every Linear, conv and norm. It applies to every backbone.

Only the operations the staged forward runs are adapted: modules registered after the last
stage (a ViT's final norm, a classifier) never run, so they get no scale and shift (the paper
also tunes the final norm of a ViT; that one would get no gradient here), and neither do
modules whose forward is never called (EVA's ``qkv`` when its biases are separate: the
attention uses the Linear's weight directly), found by one probe forward pass at attach. Scales and shifts
are parameters of the method (``method.scales.<i>``, ``method.shifts.<i>``, one pair per
adapted module in model order), applied by forward hooks: the backbone keeps its modules and
state_dict keys.

Being linear, a scale and shift after a linear, convolution or affine normalisation layer
folds into that layer's weight and bias (the paper's re-parameterisation):
:meth:`SSF.merge` does it in place for inference. timm's ``BatchNormAct2d`` (a BatchNorm
with its activation inside, as in EfficientNet) is adapted after the activation and cannot
be folded; ``merge`` refuses such a model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..staging import Stage
from ..staging import probe_sizes
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method

__all__ = ["SSFConfig", "SSF", "ssf_targets"]

_logger = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class SSFConfig(MethodConfig):
    """Settings of SSF (defaults from the paper: after every linear, conv and norm layer)."""

    linear: bool = field(default=True, metadata={"help": "scale and shift after every nn.Linear (paper: yes)"})
    conv: bool = field(default=True, metadata={"help": "scale and shift after every convolution (paper: yes)"})
    norm: bool = field(
        default=True, metadata={"help": "scale and shift after every LayerNorm / BatchNorm / GroupNorm (paper: yes)"}
    )

    def __post_init__(self) -> None:
        for name in ("linear", "conv", "norm"):
            self._check_bool(name)
        if not (self.linear or self.conv or self.norm):
            raise ValueError("SSFConfig: at least one of linear, conv and norm must be True")


def _channel_dim(module: nn.Module) -> Optional[int]:
    """The dimension of the module's output that holds its channels: last for Linear and
    channels-last LayerNorm, 1 for convolutions, BatchNorm, GroupNorm and timm's LayerNorm2d."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, _CONVS) or isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return 1
    if isinstance(module, nn.LayerNorm):
        return 1 if type(module).__name__.endswith("2d") else -1
    return None


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONVS):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    shape = tuple(module.normalized_shape)  # LayerNorm
    if len(shape) != 1:
        raise MethodNotApplicableError(f"ssf: LayerNorm over {shape} is not per-channel")
    return int(shape[0])


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return "conv"
    return "norm" if isinstance(module, _NORMS) else ""


def ssf_targets(
    backbone: nn.Module, stages: Sequence[Stage], config: SSFConfig
) -> List[Tuple[str, nn.Module, int, int]]:
    """``(name, module, channel dim, channels)`` of every module SSF adapts, in model order:
    the linear / conv / norm layers registered up to the end of the last stage module (the
    staged forward ends there; what is registered after it never runs)."""
    names = [n for n, _ in backbone.named_modules()]
    last = stages[-1].module if stages else ""
    end = len(names)
    if last in names:
        i = names.index(last)
        end = i + 1
        while end < len(names) and names[end].startswith(last + "."):
            end += 1
    wanted = {"linear": config.linear, "conv": config.conv, "norm": config.norm}
    mods = dict(backbone.named_modules())
    found = []
    for n in names[:end]:
        m = mods[n]
        kind = _kind(m)
        if not n or not kind or not wanted[kind]:
            continue
        found.append((n, m, _channel_dim(m), _channels(m)))
    ran = _modules_that_run(backbone, [m for _, m, _, _ in found])
    if ran is not None:
        skipped = [n for n, m, _, _ in found if id(m) not in ran]
        if skipped:
            _logger.info("ssf: %d module(s) never run as modules (their weights are used directly), left out: %s",
                         len(skipped), ", ".join(skipped[:8]) + (", ..." if len(skipped) > 8 else ""))
        found = [t for t in found if id(t[1]) in ran]
    return found


def _modules_that_run(backbone: nn.Module, modules: Sequence[nn.Module]) -> Optional[Set[int]]:
    """``id()`` of those of ``modules`` whose forward runs in one staged forward pass of the
    backbone on a probe input (in eval mode, without autograd), or None when the backbone is
    not staged here or runs on no probe size."""
    staged = getattr(backbone, "_promptmatch_staged", None)
    ref = next((p for p in backbone.parameters() if p.is_floating_point()), None)
    if staged is None or ref is None or staged.active:
        return None
    ran: Set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: ran.add(id(mod))) for m in modules]
    flags = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    try:
        for size in probe_sizes(staged.stages, staged.probe_size, staged.fixed_img_size, staged.patch_size):
            images = torch.zeros(1, staged.in_chans or 3, *size, device=ref.device, dtype=ref.dtype)
            try:
                with torch.no_grad():
                    staged.forward(images, check=False)
                return ran
            except Exception as e:  # another size may work
                _logger.debug("ssf probe of %s at %s failed: %r", type(backbone).__name__, size, e)
                ran.clear()
        return None
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags:
            m.training = flag


@register_method
class SSF(TuningMethod):
    """A learnable per-channel scale and shift after every operation of a frozen backbone."""

    name = "ssf"
    trains_inside_backbone = True
    config_class = SSFConfig

    def __init__(self, stages: Sequence[Stage], num_classes: int, config: SSFConfig) -> None:
        super().__init__(stages, num_classes, config)
        self.scales = nn.ParameterList()
        self.shifts = nn.ParameterList()
        self.adapted_modules: Tuple[str, ...] = ()
        self._targets: List[Tuple[nn.Module, int]] = []

    def attach(self, backbone: nn.Module) -> None:
        self.check_not_hooked()
        targets = ssf_targets(backbone, self.stages, self.config)
        if not targets:
            raise MethodNotApplicableError(
                f"ssf found no linear, convolution or normalisation layer to adapt in {type(backbone).__name__}"
            )
        if len(self.scales) == 0:
            ref = next(iter(backbone.parameters()), None)
            for _, _, _, c in targets:
                self.scales.append(nn.Parameter(torch.ones(c)))
                self.shifts.append(nn.Parameter(torch.zeros(c)))
            if ref is not None:
                self.to(ref.device)
        elif len(self.scales) != len(targets):
            raise RuntimeError(f"ssf has {len(self.scales)} scale/shift pairs for {len(targets)} modules")
        self.adapted_modules = tuple(n for n, _, _, _ in targets)
        self._targets = [(m, d) for _, m, d, _ in targets]
        for i, (_, m, d, _) in enumerate(targets):
            # before any other hook (a stage boundary on the same module sees the adapted output)
            self.hook_backbone(m, partial(self._block_hook, i, d), prepend=True)

    def detach(self) -> None:
        """Remove the hooks; the backbone computes its plain outputs again."""
        self.remove_hooks()

    def _block_hook(self, index: int, dim: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.ndim
        shape[dim] = -1
        scale = self.scales[index].to(output.dtype).view(shape)
        shift = self.shifts[index].to(output.dtype).view(shape)
        return output * scale + shift

    # ------------------------------------------------------------------ merge
    def merge(self) -> Tuple[str, ...]:
        """Fold every scale and shift into the weight and bias of the module it follows, in
        place, and remove the hooks: the backbone then computes what the adapted model did,
        with no extra operation (the paper's re-parameterisation, for inference). A module
        without a bias gets one. Returns the names of the modules changed.

        Raises ``ValueError`` (and changes nothing) when a module cannot take the fold: one
        with an operation after its affine part (timm's ``BatchNormAct2d``) or a non-affine
        norm. After a merge the method's parameters are no longer applied: train no further.
        """
        if not self.hooked:
            raise RuntimeError("ssf is not attached (or already merged): nothing to merge")
        bad = [n for n, (m, _) in zip(self.adapted_modules, self._targets) if not _foldable(m)]
        if bad:
            raise ValueError(f"ssf: cannot fold the scale and shift into {bad[:4]} (an operation follows the "
                             "affine part, or the layer has no affine weights); keep the hooks for these models")
        with torch.no_grad():
            for i, (m, _) in enumerate(self._targets):
                _fold(m, self.scales[i].detach(), self.shifts[i].detach())
        self.detach()
        return self.adapted_modules


def _foldable(m: nn.Module) -> bool:
    exact = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
             nn.GroupNorm, nn.LayerNorm)
    timm_ln = type(m).__module__.startswith("timm.layers") and type(m).__name__ in ("LayerNorm", "LayerNorm2d")
    if type(m) not in exact and not timm_ln:
        return False
    if isinstance(m, _NORMS):
        return getattr(m, "weight", None) is not None
    return True


def _fold(m: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``scale * m(x) + shift`` as ``m(x)`` with new weights: the output-channel rows of the
    weight scaled, the bias scaled and shifted."""
    w = m.weight
    scale, shift = scale.to(w), shift.to(w)
    w.mul_(scale.view(-1, *([1] * (w.ndim - 1))))
    if m.bias is None:
        m.bias = nn.Parameter(shift.clone(), requires_grad=False)
    else:
        m.bias.mul_(scale).add_(shift)
