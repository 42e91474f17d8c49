"""Tuning methods: each one a :class:`TuningMethod` registered by name.

``spm`` (ours), and the baselines ``linear`` (frozen backbone, head only), ``full``
(end-to-end fine-tuning), ``bitfit`` (biases), ``vpt`` (visual prompt tokens, ViTs),
``lora`` (low-rank adapters through peft, an optional extra) and ``adaptformer``
(parallel MLP adapters, transformers).
"""
from .adaptformer import AdaptFormer, AdaptFormerConfig
from .base import (
    MethodConfig,
    MethodNotApplicableError,
    TuningMethod,
    build_method,
    get_method,
    interim_losses,
    list_methods,
    register_method,
    saved_method_config,
    unregister_method,
)
from .bitfit import BitFit, BitFitConfig
from .full import FullFineTune, FullFineTuneConfig
from .linear import LinearProbe, LinearProbeConfig
from .lora import LoRA, LoRAConfig
from .spm import ConvGRUCell, SemanticPromptMatcher, SPMConfig
from .vpt import VisualPromptTuning, VPTConfig

__all__ = [
    "MethodConfig", "MethodNotApplicableError", "TuningMethod", "build_method", "get_method", "interim_losses", "list_methods",
    "register_method", "saved_method_config", "unregister_method",
    "SPMConfig", "SemanticPromptMatcher", "ConvGRUCell",
    "LinearProbe", "LinearProbeConfig", "FullFineTune", "FullFineTuneConfig", "BitFit", "BitFitConfig",
    "VisualPromptTuning", "VPTConfig", "LoRA", "LoRAConfig", "AdaptFormer", "AdaptFormerConfig",
]
