"""promptmatch's registries for mmengine/mmsegmentation, children of mmseg's, scope ``promptmatch``.

A config ``type='promptmatch.Name'`` makes mmengine import this module, which creates the
child registries; their ``locations`` import :mod:`promptmatch.mmseg`, which registers the
components. So configs need no ``custom_imports`` line. Importing this module imports mmseg.
"""
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import Registry
from mmseg.registry import DATASETS as MMSEG_DATASETS
from mmseg.registry import HOOKS as MMSEG_HOOKS
from mmseg.registry import MODELS as MMSEG_MODELS

_LOCATIONS = ["promptmatch.mmseg"]

MODELS = Registry("model", parent=MMSEG_MODELS, scope="promptmatch", locations=_LOCATIONS)
DATASETS = Registry("dataset", parent=MMSEG_DATASETS, scope="promptmatch", locations=_LOCATIONS)
HOOKS = Registry("hook", parent=MMSEG_HOOKS, scope="promptmatch", locations=_LOCATIONS)
# mmengine looks model wrappers up in its root registry (Runner.wrap_model), so this one hangs there
MODEL_WRAPPERS = Registry(
    "model_wrapper", parent=MMENGINE_MODEL_WRAPPERS, scope="promptmatch", locations=_LOCATIONS
)

__all__ = ["MODELS", "DATASETS", "HOOKS", "MODEL_WRAPPERS"]
