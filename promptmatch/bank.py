"""One frozen backbone in memory serving several datasets' prompt checkpoints."""
from __future__ import annotations

import os
from typing import Any, Iterator, Union

import torch
from torch import nn

from .checkpoint import load_prompts, read_prompt_metadata
from .methods import get_method, saved_method_config
from .segmentor import PromptSegmentor

__all__ = ["PromptBank"]


class PromptBank(nn.Module):
    """Several prompt checkpoints side by side on one shared frozen backbone.

    Each dataset gets its own small :class:`PromptSegmentor` (matchers + decode head)
    built around the *same* backbone module; switching datasets is a name per call,
    with no copy or reload of the backbone.

    Example::

        bank = PromptBank(backbone)
        bank.add("ade20k", "ade20k.safetensors")
        bank.add("cityscapes", "cityscapes.safetensors")
        logits = bank(images, "cityscapes")
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompts = nn.ModuleDict()

    def add(self, name: str, path: Union[str, os.PathLike]) -> PromptSegmentor:
        """Build the segmentor described by a prompt checkpoint around the shared backbone and load it."""
        if name in self.prompts:
            raise ValueError(f"a dataset named {name!r} is already in the bank")
        meta = read_prompt_metadata(path)
        if not get_method(meta["method"]).shares_backbone:
            self._refuse_sharing(name, meta["method"])
        self._refuse_sharing_with_loaded(name)
        seg = PromptSegmentor(
            self.backbone,
            num_classes=meta["num_classes"],
            method=meta["method"],
            method_cfg=saved_method_config(meta["method"], meta["method_config"]),
            decoder=meta["decoder"],
            decoder_cfg=meta.get("decoder_config"),
            class_names=meta.get("class_names"),
            stage_modules=meta["backbone"]["stage_modules"],
            ignore_index=meta.get("ignore_index", 255),
        )
        # the matchers and the head are built on the CPU in float32: follow the shared backbone
        # (a bank moved with .to("cuda") or .double() before this add)
        ref = next(self.backbone.parameters(), None)
        if ref is not None:
            seg.to(device=ref.device, dtype=ref.dtype)
        if not seg.method.shares_backbone:
            if hasattr(seg.method, "detach"):
                seg.method.detach()
            self._refuse_sharing(name, meta["method"])
        load_prompts(seg, path)
        seg.eval()
        # register the prompt parts only; the backbone stays one module of the bank
        self.prompts[name] = _PromptParts(seg)
        return seg

    def _refuse_sharing(self, name: str, method: str) -> None:
        """Refuse ``name`` (a ``method`` that changes the backbone for every pass) unless it
        is the only dataset of the bank."""
        if len(self.prompts):
            raise ValueError(
                f"cannot add {name!r} to this bank: its method {method!r} changes the backbone itself for "
                f"every pass (its weights or layers), so the datasets already loaded ({sorted(self.prompts)}) "
                "would run through it too. Give it its own backbone: a separate PromptBank, or "
                "a PromptSegmentor built around its own backbone, then promptmatch.load_prompts"
            )

    def _refuse_sharing_with_loaded(self, name: str) -> None:
        for other, parts in self.prompts.items():
            if not parts.segmentor.method.shares_backbone:
                raise ValueError(
                    f"cannot add {name!r} to this bank: {other!r} (method {parts.segmentor.method_name!r}) changes "
                    "the backbone itself for every pass, so it cannot share its backbone; build a separate "
                    "PromptBank for the other datasets"
                )

    def segmentor(self, name: str) -> PromptSegmentor:
        """The segmentor of dataset ``name`` (it shares the bank's backbone)."""
        if name not in self.prompts:
            raise KeyError(f"no dataset {name!r} in the bank; loaded: {sorted(self.prompts)}")
        return self.prompts[name].segmentor

    def names(self) -> Iterator[str]:
        return iter(self.prompts.keys())

    def forward(self, images: torch.Tensor, dataset: str) -> torch.Tensor:
        """Logits of ``images`` with the prompts of ``dataset``."""
        return self.segmentor(dataset)(images)

    def predict(self, images: Any, dataset: str, **kwargs: Any) -> Any:
        """Class maps of ``images`` (any size, paths, a folder, ...: see :func:`promptmatch.predict`,
        which takes the keyword arguments) with the prompts of ``dataset``."""
        from .predict import predict

        return predict(self.segmentor(dataset), images, **kwargs)


class _PromptParts(nn.Module):
    """Holds one dataset's method and head as submodules, and its segmentor by reference."""

    def __init__(self, seg: PromptSegmentor) -> None:
        super().__init__()
        self.method = seg.method
        self.decode_head = seg.decode_head
        object.__setattr__(self, "segmentor", seg)
