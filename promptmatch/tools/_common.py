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
