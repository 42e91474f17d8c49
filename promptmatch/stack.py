"""Whether the mmseg stack (mmengine, mmcv with its compiled ops, mmsegmentation) can be imported,
and the message that names the set-up command when it cannot.

A leaf module: :mod:`promptmatch.mmseg` and :mod:`promptmatch.registry` both ask it, and it
imports nothing from promptmatch.
"""
from __future__ import annotations

from typing import Optional, Set

__all__ = ["MMSEG_STACK_MISSING", "SETUP_COMMAND", "mmseg_stack_error", "require_mmseg_stack", "first_report"]

#: the one command that installs the mmseg stack into the repository's environment
SETUP_COMMAND = "bash tools/setup_env.sh --mmseg"

MMSEG_STACK_MISSING = (
    "promptmatch.mmseg needs the mmseg stack (mmengine 0.10.7, mmcv 2.1.0 with its compiled ops, "
    "mmsegmentation 1.2.2), which is not installed in this Python environment ({reason}). "
    "From the promptmatch checkout, run the one command:\n\n"
    f"    {SETUP_COMMAND}\n\n"
    "It builds mmcv 2.1.0 with its compiled ops from source (about 25-35 minutes the first time "
    "on 2 cores, needs g++; pip caches the build, so later set-ups take seconds) and installs "
    "mmengine, mmsegmentation, peft and the test tools into the repository's .venv (or "
    "$PROMPTMATCH_VENV); then run with that venv's python. The rest of promptmatch "
    "(import promptmatch, tools/demo.py) works without it."
)


def mmseg_stack_error() -> Optional[ImportError]:
    """None if the mmseg stack imports; else an ImportError whose message names the set-up command."""
    # importing is the only reliable test: mmcv can be installed without its compiled ops
    try:
        import mmengine  # noqa: F401
        import mmcv  # noqa: F401
        import mmcv.ops  # noqa: F401  (the compiled ops: mmseg.models imports them)
        import mmseg  # noqa: F401
    except ImportError as e:
        error = ImportError(MMSEG_STACK_MISSING.format(reason=f"{type(e).__name__}: {e}"), name=e.name)
        error.__cause__ = e
        return error
    return None


def require_mmseg_stack() -> None:
    """Raise :func:`mmseg_stack_error`'s ImportError if the mmseg stack does not import."""
    error = mmseg_stack_error()
    if error is not None:
        raise error


_reported: Set[str] = set()


def first_report(what: str) -> bool:
    """True the first time ``what`` is asked about in this process, False afterwards.

    Kept here, in a module that stays imported, because a module whose import fails (such as
    :mod:`promptmatch.registry` without the stack) starts afresh each time it is imported.
    """
    if what in _reported:
        return False
    _reported.add(what)
    return True
