"""mmsegmentation integration: prompted segmentor, timm backbone, prompt checkpoint hook.

Importing this package imports mmseg, mmcv and mmengine; ``import promptmatch`` never does.
Without them it raises an ImportError that names the one set-up command.
"""

MMSEG_STACK_MISSING = (
    "promptmatch.mmseg needs the mmseg stack (mmengine 0.10.7, mmcv 2.1.0 with its compiled ops, "
    "mmsegmentation 1.2.2), which is not installed in this Python environment ({reason}). "
    "From the promptmatch checkout, run the one command:\n\n"
    "    bash tools/setup_env.sh --mmseg\n\n"
    "It builds mmcv 2.1.0 with its compiled ops from source (about 25-35 minutes the first time "
    "on 2 cores, needs g++; pip caches the build, so later set-ups take seconds) and installs "
    "mmengine, mmsegmentation, peft and the test tools into the repository's .venv (or "
    "$PROMPTMATCH_VENV); then run with that venv's python. The rest of promptmatch "
    "(import promptmatch, tools/demo.py) works without it."
)


def _require_mmseg_stack() -> None:
    try:
        import mmengine  # noqa: F401
        import mmcv  # noqa: F401
        import mmcv.ops  # noqa: F401  (the compiled ops: mmseg.models imports them)
        import mmseg  # noqa: F401
    except ImportError as e:
        raise ImportError(MMSEG_STACK_MISSING.format(reason=f"{type(e).__name__}: {e}"), name=e.name) from e


_require_mmseg_stack()

from .datasets import OfflineSegDataset  # noqa: E402
from .hooks import PromptCheckpointHook  # noqa: E402
from .metrics import PerClassIoUMetric  # noqa: E402
from .optim import AutocastOptimWrapper  # noqa: E402
from .segmentor import PromptEncoderDecoder, default_stage_modules  # noqa: E402
from .timm_backbone import TimmBackbone  # noqa: E402
from .wrappers import CPUDistributedDataParallel, PromptDistributedDataParallel  # noqa: E402

__all__ = ["PromptEncoderDecoder", "TimmBackbone", "PromptCheckpointHook", "default_stage_modules", "CPUDistributedDataParallel",
           "PromptDistributedDataParallel", "OfflineSegDataset", "PerClassIoUMetric", "AutocastOptimWrapper"]
