"""``lora``: low-rank adapters in the frozen backbone, through peft (Hu et al., ICLR 2022), and
``dora``: their weight-decomposed variant (Liu et al., ICML 2024), peft's ``use_dora=True``.

peft is an optional extra (``pip install promptmatch[peft]``); it is imported only when a
LoRA segmentor is built, never by ``import promptmatch``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import MethodConfig, MethodNotApplicableError, TuningMethod, register_method

__all__ = ["LoRAConfig", "LoRA", "DoRAConfig", "DoRA", "lora_target_modules"]

#: last name components of attention projections adapted by default (timm ViT/DeiT/EVA/
#: DINOv2/Swin: fused ``qkv``; EVA variants: ``q_proj``/``k_proj``/``v_proj``; PVTv2: ``q``/``kv``)
_ATTN_NAMES = ("qkv", "q_proj", "k_proj", "v_proj", "q", "k", "v", "kv")
_MLP_NAMES = ("fc1", "fc2", "fc1_g", "fc1_x")
#: top-level modules that are not part of any stage: the stem and the classifier head
_NOT_STAGES = ("conv1", "bn1", "stem", "conv_stem", "patch_embed", "conv_head", "head", "fc", "classifier")


def _import_peft():
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError(
            "the 'lora' tuning method needs the optional dependency peft: pip install promptmatch[peft]"
        ) from e
    return LoraConfig, inject_adapter_in_model


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA (Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022):
    a frozen weight ``W`` becomes ``W + (alpha / r) * B A`` with ``A`` (r x in) Kaiming-
    initialised and ``B`` (out x r) zero-initialised, so at initialisation the model computes
    exactly what the frozen backbone computes.

    Defaults follow the paper: rank 8 on the attention projections (the paper adapts W_q and
    W_v; timm ViTs fuse them into one ``qkv`` Linear, which is adapted as a whole), and
    ``alpha = r`` ("we simply set alpha to the first r we try and do not tune it"), so the
    scale alpha/r is 1. Dropout is 0 (the paper uses 0.1 only for some GPT-2 runs).

    Targets with ``target_modules=None`` (automatic, by family):

    * token models (ViT, DeiT, EVA, DINOv2, Swin, PVTv2): the attention projection Linears
      (``qkv``, or ``q_proj``/``k_proj``/``v_proj``, ``q``/``kv``), plus the MLP ``fc1``/``fc2``
      with ``mlp=True``;
    * CNNs: every dense (``groups == 1``) ``nn.Conv2d`` with a kernel larger than 1x1 outside
      the stem (ResNet: the 3x3 ``layerN.M.convK``); in families whose spatial convs are all
      depthwise (EfficientNet, MobileNet) the dense 1x1 convs of the blocks instead. The stem
      (convs reading the image, ``conv1``/``stem``/``conv_stem``) and ``conv_head`` are left out.

    ``target_modules`` may instead be a regular expression matched in full against module
    names (e.g. ``r"layer[34]\\.\\d+\\.conv2"``) or a list of module names or name suffixes
    (e.g. ``["qkv", "proj"]``), as in peft. Only ``nn.Linear`` and ``nn.Conv2d`` can be targets.
    """

    r: int = field(default=8, metadata={"help": "rank of the low-rank update (Hu et al. 2022: 8)"})
    alpha: float = field(default=8.0, metadata={"help": "scaling numerator: the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input, in [0, 1)"})
    target_modules: Optional[Union[str, Tuple[str, ...]]] = field(
        default=None,
        metadata={"help": "None: automatic by family; a regex matched in full against module names; "
                          "or a list of module names / name suffixes"},
    )
    mlp: bool = field(default=False, metadata={"help": "automatic targets of token models also include MLP fc1/fc2"})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an int >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be a number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self._check_bool("mlp")
        t = self.target_modules
        if t is None:
            return
        if self.mlp:
            raise ValueError("LoRAConfig.mlp only applies to automatic targets (target_modules=None); "
                             "name fc1/fc2 in target_modules instead")
        if isinstance(t, str):
            if not t:
                raise ValueError("LoRAConfig.target_modules must not be an empty string")
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(f"LoRAConfig.target_modules {t!r} is not a valid regular expression: {e}") from None
            return
        if not isinstance(t, Sequence) or not t or not all(isinstance(s, str) and s for s in t):
            raise ValueError(
                f"LoRAConfig.target_modules must be None, a regex string or a non-empty list of module names, got {t!r}"
            )
        self.target_modules = tuple(t)


def _in_chans(backbone: nn.Module) -> Optional[int]:
    staged = getattr(backbone, "_promptmatch_staged", None)
    if staged is not None:
        return staged.in_chans
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _is_stem(name: str, conv: nn.Conv2d, in_chans: Optional[int]) -> bool:
    return name.split(".", 1)[0] in _NOT_STAGES or (in_chans is not None and conv.in_channels == in_chans)


def lora_target_modules(backbone: nn.Module, config: LoRAConfig, stage_modules: Sequence[str] = ()) -> List[str]:
    """Full names of the modules of ``backbone`` that LoRA adapts under ``config``; none of
    them may be one of ``stage_modules`` (their boundary hooks would be lost)."""
    mods = dict(backbone.named_modules())
    t = config.target_modules
    if isinstance(t, str):
        names = [n for n in mods if n and re.fullmatch(t, n)]
    elif t is not None:
        names = [n for n in mods if n and any(n == s or n.endswith("." + s) for s in t)]
    else:
        attn = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in _ATTN_NAMES
                and n.split(".", 1)[0] not in _NOT_STAGES]
        if attn:
            names = attn
            if config.mlp:
                names += [n for n, m in mods.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in _MLP_NAMES
                          and n.split(".", 1)[0] not in _NOT_STAGES]
        else:
            ic = _in_chans(backbone)
            dense = [(n, m) for n, m in mods.items()
                     if isinstance(m, nn.Conv2d) and m.groups == 1 and not _is_stem(n, m, ic)]
            names = [n for n, m in dense if max(m.kernel_size) > 1] or [n for n, _ in dense]
        names = sorted(set(names), key=list(mods).index)
    if not names:
        what = f"target_modules={t!r}" if t is not None else "the automatic targets (attention Linears, dense convs)"
        raise MethodNotApplicableError(f"lora: {what} match no module of {type(backbone).__name__}")
    clash = [n for n in names if n in set(stage_modules)]
    if clash:
        raise ValueError(f"lora: stage modules {clash} cannot be LoRA targets (they end the stages)")
    bad = [n for n in names if not isinstance(mods[n], (nn.Linear, nn.Conv2d))]
    if bad:
        raise ValueError(f"lora: target_modules must be nn.Linear or nn.Conv2d modules; {bad[:4]} are not")
    grouped = [n for n in names if isinstance(mods[n], nn.Conv2d) and config.r % mods[n].groups]
    if grouped:
        raise ValueError(f"lora: rank r={config.r} is not a multiple of the groups of the grouped convs {grouped[:4]}")
    return names


class _MethodDropout(nn.Module):
    """Dropout that follows the *method's* train/eval mode: the frozen backbone it sits in
    is kept in eval mode for good, so a plain ``nn.Dropout`` there would never drop."""

    def __init__(self, p: float, owner: nn.Module) -> None:
        super().__init__()
        self.p = p
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self._owner.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@register_method
class LoRA(TuningMethod):
    """LoRA adapters injected into the frozen backbone by peft; only ``lora_A``/``lora_B`` train.

    Injection replaces each target ``qkv`` by a peft layer that wraps it, so backbone state_dict
    keys of targets change (``qkv.weight`` -> ``qkv.base_layer.weight``); a model rebuilt with
    the same config gets the same structure, so prompt checkpoints round-trip. Stage modules
    (the blocks or layers whose outputs are the boundaries) are never targets and keep their
    boundary hooks. Nothing sits between the stages.
    """

    name = "lora"
    renames_backbone_keys = True
    trains_inside_backbone = True
    shares_backbone = False  # peft's layers replace the backbone's own
    config_class = LoRAConfig
    ADAPTER = "default"
    #: peft's ``use_dora``: the weight-decomposed variant (:class:`DoRA`)
    USE_DORA: bool = False
    #: names of the peft parameters that train (DoRA adds ``lora_magnitude_vector``)
    TRAINED = ("lora_A", "lora_B")

    def attach(self, backbone: nn.Module) -> None:
        cfg: LoRAConfig = self.config
        LoraConfig, inject_adapter_in_model = _import_peft()
        stage_names = {s.module for s in self.stages}
        targets = lora_target_modules(backbone, cfg, sorted(stage_names))
        hooked = {n: backbone.get_submodule(n) for n in stage_names}
        peft_cfg = LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets),
            bias="none", init_lora_weights=True, use_dora=self.USE_DORA,
        )
        inject_adapter_in_model(peft_cfg, backbone, adapter_name=self.ADAPTER)
        if hasattr(backbone, "peft_config"):
            try:
                del backbone.peft_config  # a peft bookkeeping attribute; the config lives in self.config
            except AttributeError:
                pass
        moved = [n for n, m in hooked.items() if backbone.get_submodule(n) is not m]
        if moved:  # pragma: no cover - guarded by the clash check above
            raise RuntimeError(f"lora injection replaced the stage modules {moved}: their boundary hooks are lost")
        for name, p in backbone.named_parameters():
            p.requires_grad_(any(t in name for t in self.TRAINED))
        for mod in backbone.modules():
            drop = getattr(mod, "lora_dropout", None)
            if isinstance(drop, nn.ModuleDict) and self.ADAPTER in drop and isinstance(drop[self.ADAPTER], nn.Dropout):
                drop[self.ADAPTER] = _MethodDropout(cfg.dropout, self)
        self.target_names = tuple(targets)


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al., *DoRA: Weight-Decomposed Low-Rank Adaptation*, ICML 2024): each target
    weight is split into a magnitude (one trainable scalar per output channel, initialised to
    the column norms of ``W``) and a direction updated by LoRA::

        W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||

    With ``B`` zero-initialised, ``W' = W`` at initialisation. Same fields, defaults and targets
    as :class:`LoRAConfig`, so the two compare at equal rank; ``dropout`` must stay 0: peft applies DoRA's dropout only while the adapted layer is in
    training mode, and the frozen backbone stays in eval mode, so a dropout would be silently
    ignored.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout != 0.0:
            raise ValueError(
                f"DoRAConfig.dropout must be 0, got {self.dropout!r}: peft applies DoRA's dropout only to "
                "layers in training mode, and the frozen backbone stays in eval mode (it would be ignored)")


@register_method
class DoRA(LoRA):
    """DoRA through peft (``use_dora=True``): LoRA's adapters plus a trainable magnitude vector
    per target; everything else (targets, checkpoints, renamed keys) as :class:`LoRA`."""

    name = "dora"
    config_class = DoRAConfig
    USE_DORA = True
    TRAINED = ("lora_A", "lora_B", "lora_magnitude_vector")
