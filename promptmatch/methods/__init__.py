"""Tuning methods: each one a :class:`TuningMethod` registered by name."""
from .base import MethodConfig, MethodNotApplicableError, TuningMethod, build_method, get_method, list_methods, register_method
from .linear import LinearProbe, LinearProbeConfig
from .spm import ConvGRUCell, SemanticPromptMatcher, SPMConfig

__all__ = [
    "MethodConfig", "MethodNotApplicableError", "TuningMethod", "build_method", "get_method", "list_methods", "register_method",
    "LinearProbe", "LinearProbeConfig", "SPMConfig", "SemanticPromptMatcher", "ConvGRUCell",
]
