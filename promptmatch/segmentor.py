"""A frozen backbone, a tuning method between its stages, and a decode head."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, input_normalisation
from .checkpoint import backbone_architecture, describe_model
from .core import PromptedCore
from .decoders import DecoderConfig, build_decoder, get_decoder
from .methods import MethodConfig, get_method, interim_losses
from .staging import StagedBackbone

__all__ = ["PromptSegmentor", "create_segmentor"]

_logger = logging.getLogger(__name__)


class PromptSegmentor(PromptedCore, nn.Module):
    """Semantic segmentation with a frozen, staged backbone.

    ``backbone`` is the original model (its state_dict keys unchanged); ``method`` holds the
    trainable parts that act between its stages; ``decode_head`` maps the boundary features
    to class logits. Use :func:`create_segmentor` to build one.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        method: str = "spm",
        method_cfg: Optional[Union[MethodConfig, Mapping[str, Any]]] = None,
        decoder: str = "linear",
        decoder_cfg: Optional[Union[DecoderConfig, Mapping[str, Any]]] = None,
        class_names: Optional[Sequence[str]] = None,
        stage_modules: Optional[Sequence[str]] = None,
        num_stages: Optional[int] = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != num_classes:
                raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}")
        if not isinstance(decoder, str):
            raise TypeError(f"decoder must be a name, got {type(decoder).__name__}")
        self.num_classes = num_classes
        self.class_names = class_names
        self.ignore_index = ignore_index
        self.backbone = backbone
        #: ``(mean, std)`` (0..1 scale) raw images are normalised with, in training and prediction:
        #: the backbone's pretrained statistics; a loaded checkpoint's record replaces it
        self.input_normalisation = input_normalisation(backbone)
        get_decoder(decoder)  # an unknown name fails before the backbone is touched
        get_method(method)  # an unknown name fails before the backbone is touched

        def build_head() -> None:
            self.decoder_name = decoder
            # what checkpoints record: the fields given (a dict), or all of them (a config dataclass)
            self.decoder_cfg = (decoder_cfg.to_dict() if isinstance(decoder_cfg, DecoderConfig)
                                else dict(decoder_cfg or {}))
            self.decode_head = build_decoder(decoder, self.staged.stages, num_classes, decoder_cfg)
            reads = getattr(self.decode_head, "stages_read", None)
            if reads is not None:  # e.g. SPM drops the decoder prompts of levels it never reads
                self.method.decoder_reads(reads(len(self.staged.stages)))

        self._init_prompted(backbone, method, num_classes, method_cfg, stage_modules=stage_modules,
                            num_stages=num_stages, then=build_head)

    staged: StagedBackbone

    # -------------------------------------------------------------- forward
    def forward_features(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
        """The features the decoder reads (the boundary features after the method acted on
        them, as the method hands them to a decoder), and the method's per-pass state."""
        feats, state = self.prompted_features(images)
        return self.method.decoder_features(feats, state), state

    def _decode(self, feats: List[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        logits = self.decode_head(feats)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, K, H, W)`` at the input resolution."""
        feats, _ = self.forward_features(images)
        return self._decode(feats, images.shape[-2:])

    # ----------------------------------------------------------------- loss
    def _check_labels(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.ndim == 4 and labels.shape[1] == 1:
            raise ValueError(f"labels must have shape (N, H, W), got {tuple(labels.shape)}: squeeze the channel dim")
        if labels.ndim != 3:
            raise ValueError(f"labels must have shape (N, H, W), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
        want = (images.shape[0], images.shape[2], images.shape[3])
        if tuple(labels.shape) != want:
            raise ValueError(f"labels have shape {tuple(labels.shape)} but images need {want} (N, H, W)")
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bool(bad.any()):
            vals = torch.unique(labels[bad])[:8].tolist()
            raise ValueError(
                f"labels contain values {vals} outside [0, {self.num_classes}) that are not the "
                f"ignore index {self.ignore_index}"
            )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Named losses: ``loss_decode`` and one ``loss_interim_<k>`` per interim semantic map.

        Their sum is the training loss. Pixels labelled ``ignore_index`` are ignored; labels
        are resized to each interim map's grid by nearest neighbour.
        """
        self.staged.check_input(images)
        self._check_labels(images, labels)
        labels = labels.long()
        feats, state = self.forward_features(images)
        logits = self._decode(feats, images.shape[-2:])
        if bool((labels != self.ignore_index).any()):
            decode = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
        else:  # no labelled pixel: a zero loss that keeps the graph (a mean over nothing is NaN)
            decode = logits.sum() * 0.0
        losses = {"loss_decode": decode}
        losses.update(interim_losses(self.method, state, labels, self.ignore_index))
        return losses

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices ``(N, H, W)`` of a normalised batch at a size the backbone accepts
        (:func:`promptmatch.predict` takes any size, raw images, paths and sliding windows)."""
        return self.forward(images).argmax(1)

    # ------------------------------------------------------------- identity
    def describe(self) -> Dict[str, Any]:
        """Everything a prompt checkpoint must agree with to be loaded onto this model."""
        return describe_model(
            self,
            method=self.method_name,
            method_config=self.method.config.to_dict(),
            decoder=self.decoder_name,
            decoder_config=dict(self.decoder_cfg),
            num_classes=self.num_classes,
            class_names=self.class_names,
            ignore_index=self.ignore_index,
            architecture=backbone_architecture(self.backbone),
            input_normalisation=self.input_normalisation,
        )


def create_segmentor(
    backbone: Union[str, nn.Module],
    method: str = "spm",
    num_classes: int = 150,
    decoder: str = "linear",
    *,
    method_cfg: Optional[Union[MethodConfig, Mapping[str, Any]]] = None,
    decoder_cfg: Optional[Union[DecoderConfig, Mapping[str, Any]]] = None,
    class_names: Optional[Sequence[str]] = None,
    pretrained: bool = False,
    weights: Optional[str] = None,
    weights_remap: bool = False,
    stage_modules: Optional[Sequence[str]] = None,
    num_stages: Optional[int] = None,
    ignore_index: int = 255,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
) -> PromptSegmentor:
    """Build a segmentor from a timm model name or an existing model, frozen and staged.

    Args:
        backbone: a timm model name, or an ``nn.Module`` (wrapped in place: its
            state_dict keys stay unchanged and it is reachable as ``model.backbone``).
        method: the tuning method (``"spm"``; see :func:`promptmatch.list_methods`).
        num_classes: number of classes K of the dataset.
        decoder: a registered decoder (:func:`promptmatch.list_decoders`): ``"linear"`` (one linear
            layer on the last features), ``"multilevel"``, or one added with :func:`promptmatch.register_decoder`.
        method_cfg: the method's config dataclass (e.g. :class:`SPMConfig`) or a dict of its fields.
        decoder_cfg: the decoder's config dataclass (e.g. :class:`LinearDecoderConfig`) or a dict of its fields.
        class_names: names of the K classes, stored in prompt checkpoints.
        pretrained, weights, weights_remap: see :func:`create_backbone` (name only).
        stage_modules: names of the modules that end the stages (default: ``feature_info``).
        num_stages: number of block groups for plain ViTs (default 4).
        ignore_index: label value ignored by the losses.
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (name only).
    """
    if isinstance(backbone, str):
        model = create_backbone(
            backbone, pretrained=pretrained, weights=weights, weights_remap=weights_remap, **dict(backbone_kwargs or {})
        )
    elif isinstance(backbone, nn.Module):
        if pretrained or weights is not None or backbone_kwargs:
            raise ValueError(
                "pretrained, weights and backbone_kwargs apply only when the backbone is given by "
                "name; load weights into your module before passing it"
            )
        model = backbone
    else:
        raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
    return PromptSegmentor(
        model,
        num_classes,
        method=method,
        method_cfg=method_cfg,
        decoder=decoder,
        decoder_cfg=decoder_cfg,
        class_names=class_names,
        stage_modules=stage_modules,
        num_stages=num_stages,
        ignore_index=ignore_index,
    )
