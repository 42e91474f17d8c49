"""Tuning methods: each one a :class:`TuningMethod` registered by name.

``spm`` (ours), and the baselines ``linear`` (frozen backbone, head only), ``full``
(end-to-end fine-tuning), ``bitfit`` (biases), ``vpt`` (visual prompt tokens, ViTs),
``lora`` (low-rank adapters through peft, an optional extra) and ``adaptformer``
(parallel MLP adapters, transformers); and peers from recent literature: ``ssf``
(per-channel scale and shift after every operation), ``mona`` (multi-cognitive conv adapters,
transformers), ``rein`` (learnable low-rank tokens refining every block's output,
transformers), ``dora`` (weight-decomposed LoRA through peft) and ``side`` (an E3VA-style side
adapter: no gradient crosses the backbone).
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
from .lora import DoRA, DoRAConfig, LoRA, LoRAConfig
from .mona import Mona, MonaConfig
from .rein import Rein, ReinConfig
from .side import SideAdapter, SideAdapterConfig
from .spm import ConvGRUCell, SemanticPromptMatcher, SPMConfig
from .ssf import SSF, SSFConfig
from .vpt import VisualPromptTuning, VPTConfig

__all__ = [
    "MethodConfig", "MethodNotApplicableError", "TuningMethod", "build_method", "get_method", "interim_losses", "list_methods",
    "register_method", "saved_method_config", "unregister_method",
    "SPMConfig", "SemanticPromptMatcher", "ConvGRUCell",
    "LinearProbe", "LinearProbeConfig", "FullFineTune", "FullFineTuneConfig", "BitFit", "BitFitConfig",
    "VisualPromptTuning", "VPTConfig", "LoRA", "LoRAConfig", "AdaptFormer", "AdaptFormerConfig",
    "SSF", "SSFConfig", "Mona", "MonaConfig", "Rein", "ReinConfig", "DoRA", "DoRAConfig",
    "SideAdapter", "SideAdapterConfig",
]
