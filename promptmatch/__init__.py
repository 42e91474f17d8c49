"""promptmatch: parameter-efficient tuning of frozen vision backbones for semantic segmentation.

A frozen CNN or ViT is split into stages and a trainable, recurrent Semantic-aware Prompt
Matcher (SPM) sits between them; only the matchers and the decode head train, and each
dataset keeps a small prompt checkpoint.
"""
from .backbones import WeightsNotFoundError, create_backbone, input_normalisation
from .bank import PromptBank
from .checkpoint import (
    PromptChecksumError,
    PromptMismatchError,
    backbone_fingerprint,
    load_prompts,
    read_prompt_metadata,
    save_prompts,
)
from .core import PromptCheckpointable
from .divergence import DivergenceError, DivergenceGuard, NonFiniteError
from .decoders import (
    DecoderConfig,
    LinearDecoder,
    LinearDecoderConfig,
    MultiLevelDecoder,
    MultiLevelDecoderConfig,
    build_decoder,
    get_decoder,
    list_decoders,
    register_decoder,
)
from .methods import (
    AdaptFormerConfig,
    BitFitConfig,
    DoRAConfig,
    FullFineTuneConfig,
    LinearProbeConfig,
    LoRAConfig,
    MonaConfig,
    ReinConfig,
    SideAdapterConfig,
    SSFConfig,
    VPTConfig,
    MethodConfig,
    MethodNotApplicableError,
    SemanticPromptMatcher,
    SPMConfig,
    TuningMethod,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)
from .export import ExportError, ExportReport, export_onnx
from .inference import segment_logits
from .merged import MergedChecksumError, MergedSegmentorError, load_segmentor, read_segmentor_metadata, save_segmentor
from .predict import IMAGENET_MEAN, IMAGENET_STD, SizeRule, predict, size_rule
from .params import ParameterReport, parameter_report
from .segmentor import PromptSegmentor, create_segmentor
from .staging import Stage, StagedBackbone, stage_backbone
from .version import __version__
from .weights import OfflineWeightsError, list_offline_weights, offline_weights

__all__ = [
    "__version__",
    "create_segmentor",
    "create_backbone",
    "input_normalisation",
    "PromptSegmentor",
    "PromptCheckpointable",
    "PromptBank",
    "save_prompts",
    "load_prompts",
    "read_prompt_metadata",
    "backbone_fingerprint",
    "PromptMismatchError",
    "PromptChecksumError",
    "DivergenceError",
    "DivergenceGuard",
    "NonFiniteError",
    "WeightsNotFoundError",
    "parameter_report",
    "ParameterReport",
    "SPMConfig",
    "LinearProbeConfig",
    "FullFineTuneConfig",
    "BitFitConfig",
    "VPTConfig",
    "LoRAConfig",
    "AdaptFormerConfig",
    "SSFConfig",
    "MonaConfig",
    "ReinConfig",
    "DoRAConfig",
    "SideAdapterConfig",
    "SemanticPromptMatcher",
    "MethodConfig",
    "MethodNotApplicableError",
    "TuningMethod",
    "register_method",
    "unregister_method",
    "get_method",
    "list_methods",
    "LinearDecoder",
    "MultiLevelDecoder",
    "list_decoders",
    "register_decoder",
    "get_decoder",
    "build_decoder",
    "DecoderConfig",
    "LinearDecoderConfig",
    "MultiLevelDecoderConfig",
    "Stage",
    "StagedBackbone",
    "stage_backbone",
    "offline_weights",
    "list_offline_weights",
    "OfflineWeightsError",
    "predict",
    "segment_logits",
    "export_onnx",
    "ExportError",
    "ExportReport",
    "save_segmentor",
    "load_segmentor",
    "read_segmentor_metadata",
    "MergedSegmentorError",
    "MergedChecksumError",
    "size_rule",
    "SizeRule",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
