"""What the measuring tools share: method variants on the command line, backbone weights by
name, and writing a result file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["split_variant", "resolve_weights", "write_result"]


def split_variant(text: str) -> Tuple[str, Optional[Dict[str, Any]], str]:
    """``method`` or ``method:JSON`` -> (method, config or ``None``, the text itself as its label)."""
    name, _, cfg = text.partition(":")
    return name, (json.loads(cfg) if cfg else None), text


def resolve_weights(text: Optional[str]) -> Tuple[Optional[str], bool]:
    """``(weights path or None, weights_remap)`` of a ``--weights`` value: a packaged weights
    name (``promptmatch.list_offline_weights()``), a local file, or ``none``/empty (random init)."""
    import promptmatch as pm

    if not text or text == "none":
        return None, False
    if text in pm.list_offline_weights():
        _, path, remap = pm.offline_weights(text)
        return str(path), remap
    return text, False


def write_result(path: Union[str, os.PathLike], result: Any) -> None:
    """Write ``result`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


def run_mmseg_tool(module: str, usage: str, argv: Optional[list] = None) -> int:
    """Run the mmseg command-line tool ``module`` (``promptmatch.mmseg.cli.<name>``); without the
    mmseg stack, ``-h``/``--help`` prints ``usage`` (the options, and what needs no mmseg) and
    anything else exits with the set-up command."""
    import importlib
    import sys

    from promptmatch.stack import mmseg_stack_error

    args = list(sys.argv[1:] if argv is None else argv)
    error = mmseg_stack_error()
    if error is None:
        return importlib.import_module(module).main(args)
    if any(a in ("-h", "--help") for a in args):
        print(usage.strip())
        print(f"\nThe mmseg stack is not installed here ({error.__cause__}); this form needs it:\n"
              "  bash tools/setup_env.sh --mmseg")
        return 0
    raise SystemExit(f"error: this form needs the mmseg stack. {error}")
