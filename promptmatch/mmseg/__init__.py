"""mmsegmentation integration: prompted segmentor, timm backbone, prompt checkpoint hook.

Importing this package imports mmseg, mmcv and mmengine; ``import promptmatch`` never does.
Without them it raises an ImportError that names the one set-up command.
"""

from ..stack import MMSEG_STACK_MISSING, require_mmseg_stack

require_mmseg_stack()

from .datasets import OfflineSegDataset  # noqa: E402
from .hooks import PromptCheckpointHook  # noqa: E402
from .inference import init_model  # noqa: E402
from .metrics import PerClassIoUMetric  # noqa: E402
from .optim import AutocastOptimWrapper  # noqa: E402
from .segmentor import PromptEncoderDecoder, default_stage_modules  # noqa: E402
from .timm_backbone import TimmBackbone  # noqa: E402
from .wrappers import CPUDistributedDataParallel, PromptDistributedDataParallel  # noqa: E402

__all__ = ["MMSEG_STACK_MISSING", "PromptEncoderDecoder", "TimmBackbone", "PromptCheckpointHook", "default_stage_modules",
           "CPUDistributedDataParallel", "PromptDistributedDataParallel", "OfflineSegDataset", "PerClassIoUMetric",
           "AutocastOptimWrapper", "init_model"]
