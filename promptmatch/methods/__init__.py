"""Tuning methods: each one a :class:`TuningMethod` registered by name."""
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, build_method, get_method, list_methods, register_method
from .linear import LinearProbe, LinearProbeConfig
from .spm import ConvGRUCell, SemanticPromptMatcher, SPMConfig

__all__ = [
    "MethodConfig", "MethodNotApplicableError", "TuningMethod", "build_method", "get_method", "list_methods", "register_method",
    "LinearProbe", "LinearProbeConfig", "SPMConfig", "SemanticPromptMatcher", "ConvGRUCell",
]
from .full import FullFineTune, FullFineTuneConfig  # noqa: E402
from .bitfit import BitFit, BitFitConfig  # noqa: E402

__all__ += ["FullFineTune", "FullFineTuneConfig", "BitFit", "BitFitConfig"]
from .vpt import VisualPromptTuning, VPTConfig  # noqa: E402
from .adaptformer import AdaptFormer, AdaptFormerConfig  # noqa: E402

__all__ += ["VisualPromptTuning", "VPTConfig", "AdaptFormer", "AdaptFormerConfig"]
from .lora import LoRA, LoRAConfig  # noqa: E402

__all__ += ["LoRA", "LoRAConfig"]
