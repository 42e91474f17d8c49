"""promptmatch's registries for mmengine/mmsegmentation, children of mmseg's, scope ``promptmatch``.

A config ``type='promptmatch.Name'`` makes mmengine import this module, which creates the
child registries; their ``locations`` import :mod:`promptmatch.mmseg`, which registers the
components. So configs need no ``custom_imports`` line. Importing this module imports mmseg;
without the mmseg stack it raises the ImportError of :mod:`promptmatch.stack` that names the
set-up command, and logs it too when mmengine is the importer (mmengine swallows ImportErrors
of ``<scope>.registry`` and would otherwise only say that the type is not registered).
"""
import logging
import sys

from .stack import first_report, mmseg_stack_error


def _stack_missing(missing: ImportError) -> ImportError:
    """The ImportError that names the set-up command (``missing`` itself if the stack imports),
    logged through mmengine once per process when mmengine is importing this module."""
    stack_error = mmseg_stack_error()
    if stack_error is None:
        return missing
    error = ImportError(str(stack_error), name=missing.name)
    frame = sys._getframe(1)
    while frame is not None and not frame.f_globals.get("__name__", "").startswith("mmengine."):
        frame = frame.f_back
    if frame is not None and first_report("registry: mmseg stack missing"):
        # logging is a courtesy: the ImportError raised below carries the message either way
        try:
            from mmengine.logging import print_log

            print_log(f"promptmatch.registry: {error}", logger="current", level=logging.ERROR)
        except Exception:  # noqa: BLE001
            pass
    return error


try:
    from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
    from mmengine.registry import Registry
    from mmseg.registry import DATASETS as MMSEG_DATASETS
    from mmseg.registry import HOOKS as MMSEG_HOOKS
    from mmseg.registry import METRICS as MMSEG_METRICS
    from mmseg.registry import MODELS as MMSEG_MODELS
    from mmseg.registry import OPTIM_WRAPPERS as MMSEG_OPTIM_WRAPPERS
except ImportError as _missing:
    raise _stack_missing(_missing) from _missing

_LOCATIONS = ["promptmatch.mmseg"]

MODELS = Registry("model", parent=MMSEG_MODELS, scope="promptmatch", locations=_LOCATIONS)
DATASETS = Registry("dataset", parent=MMSEG_DATASETS, scope="promptmatch", locations=_LOCATIONS)
HOOKS = Registry("hook", parent=MMSEG_HOOKS, scope="promptmatch", locations=_LOCATIONS)
METRICS = Registry("metric", parent=MMSEG_METRICS, scope="promptmatch", locations=_LOCATIONS)
OPTIM_WRAPPERS = Registry("optim_wrapper", parent=MMSEG_OPTIM_WRAPPERS, scope="promptmatch", locations=_LOCATIONS)
# mmengine looks model wrappers up in its root registry (Runner.wrap_model), so this one hangs there
MODEL_WRAPPERS = Registry(
    "model_wrapper", parent=MMENGINE_MODEL_WRAPPERS, scope="promptmatch", locations=_LOCATIONS
)

__all__ = ["MODELS", "DATASETS", "HOOKS", "METRICS", "OPTIM_WRAPPERS", "MODEL_WRAPPERS"]
