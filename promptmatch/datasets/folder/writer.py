"""Writing a folder dataset (mmseg layout plus ``classes.json``) into place atomically: the
one writer behind ``export_offline_as_folder`` and ``render_offline_as_folder``."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

__all__ = ["write_folder_dataset", "check_destination", "PNG_COMPRESS_LEVEL"]

#: zlib level of the PNG files written (fast; the files are read back losslessly either way)
PNG_COMPRESS_LEVEL = 1

#: one sample: ``(file name, image, mask)``; an image or mask is a ``Path`` (copied byte for
#: byte) or a PIL image (saved as PNG)
Sample = Tuple[str, Any, Any]


def check_destination(dest: Path, what: str) -> None:
    """Refuse a ``dest`` that exists and is not an empty folder (``what`` names the export)."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
            raise FileExistsError(f"{dest} already exists and is not an empty folder; remove it or "
                                  f"choose another destination for {what}")


def _put(item: Any, out: Path) -> None:
    if isinstance(item, Path):
        shutil.copyfile(item, out)
    else:
        item.save(out, compress_level=PNG_COMPRESS_LEVEL)


def write_folder_dataset(dest: Path, classes: Sequence[str], palette: Sequence[Sequence[int]],
                         splits: Mapping[str, Iterable[Sample]]) -> Dict[str, int]:
    """Write ``img_dir/<split>/``, ``ann_dir/<split>/`` and ``classes.json`` (``{"classes":
    [...], "palette": [...]}``) into a temporary folder next to ``dest`` and rename it into
    place, so an interrupted write leaves no ``dest``. ``dest`` must not exist or be an empty
    folder (see :func:`check_destination`). Returns the number of samples per split."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")  # unique: concurrent writes
    tmp.mkdir()
    try:
        counts = {}
        for split, samples in splits.items():
            for sub in ("img_dir", "ann_dir"):
                (tmp / sub / split).mkdir(parents=True)
            n = 0
            for file, image, mask in samples:
                _put(image, tmp / "img_dir" / split / file)
                _put(mask, tmp / "ann_dir" / split / file)
                n += 1
            counts[split] = n
        (tmp / "classes.json").write_text(json.dumps({"classes": list(classes), "palette": [list(c) for c in palette]},
                                                     indent=1) + "\n", encoding="utf-8")
        if dest.is_dir():
            dest.rmdir()  # empty (checked by the caller); rename() cannot replace it everywhere
        os.replace(tmp, dest)
    except BaseException:  # any failure, interrupt included: leave nothing half written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
