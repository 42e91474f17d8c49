"""mmsegmentation integration: prompted segmentor, timm backbone, prompt checkpoint hook.

Importing this package imports mmseg, mmcv and mmengine; ``import promptmatch`` never does.
"""
from .datasets import OfflineSegDataset
from .hooks import PromptCheckpointHook
from .segmentor import PromptEncoderDecoder, default_stage_modules
from .timm_backbone import TimmBackbone
from .wrappers import CPUDistributedDataParallel, PromptDistributedDataParallel

__all__ = ["PromptEncoderDecoder", "TimmBackbone", "PromptCheckpointHook", "default_stage_modules", "CPUDistributedDataParallel",
           "PromptDistributedDataParallel", "OfflineSegDataset"]
