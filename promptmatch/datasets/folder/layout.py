"""The description of a folder dataset: its root, classes, palette, splits and suffixes
(:class:`FolderDataset`, :func:`describe_folder_dataset`), and the error that lists every
problem found (:class:`FolderDatasetError`)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["FolderDataset", "FolderDatasetError", "describe_folder_dataset", "PathLike", "Colour"]

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Colour = Tuple[int, int, int]

CLASSES_JSON = "classes.json"
CLASSES_TXT = "classes.txt"

class FolderDatasetError(ValueError):
    """The folder dataset is malformed; ``.problems`` lists every problem found (one string each)."""

    problems: List[str]
    root: Optional[Path]

    def __init__(self, problems: Union[str, Sequence[str]], root: Optional[PathLike] = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.root = Path(root) if root is not None else None
        where = f"folder dataset {self.root}" if self.root is not None else "folder dataset"
        n = len(self.problems)
        message = f"{where} has {n} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.problems, self.root))


# ----------------------------------------------------------------------------- description
def _spec_problems(classes: Any, palette: Any, splits: Any, img_suffix: Any,
                   seg_map_suffix: Any, ignore_index: Any) -> List[str]:
    """What is wrong with these dataset settings (empty list: nothing)."""
    problems: List[str] = []
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        problems.append(f"classes must be a list of class names, got {type(classes).__name__} "
                        f"{classes!r}")
        classes = None
    else:
        if len(classes) < 1:
            problems.append("no classes: give at least one class name")
        bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
        if bad:
            problems.append(f"class names must be non-empty strings, got {bad[:5]!r}")
        seen: Dict[Any, int] = {}
        for c in classes:
            if isinstance(c, str):
                seen[c] = seen.get(c, 0) + 1
        dups = sorted(c for c, k in seen.items() if k > 1)
        if dups:
            problems.append(f"duplicate class names {', '.join(map(repr, dups))}: every class "
                            f"needs its own name (label value = position in the list)")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not 0 <= ignore_index <= 255:
        problems.append(f"ignore_index must be an int in 0..255 (uint8 masks), got {ignore_index!r}")
    elif classes is not None and len(classes) > ignore_index:
        problems.append(f"{len(classes)} classes do not fit below the ignore index {ignore_index} "
                        f"(label values 0..{len(classes) - 1} must differ from it)")
    if isinstance(palette, np.ndarray):
        palette = palette.tolist()
    if palette is not None:
        if isinstance(palette, str) or not isinstance(palette, Sequence):
            problems.append(f"palette must be a list of [r, g, b] colours, got {palette!r}")
        else:
            if classes is not None and len(palette) != len(classes):
                problems.append(f"palette has {len(palette)} colours but there are {len(classes)} "
                                f"classes: give one [r, g, b] colour per class")
            bad_colours = [c for c in palette if not _is_colour(c)]
            if bad_colours:
                problems.append(f"palette colours must be [r, g, b] with ints in 0..255, got "
                                f"{bad_colours[:5]!r}")
    if isinstance(splits, str) or not isinstance(splits, Sequence) or not splits:
        problems.append(f"splits must be a non-empty list of split folder names, got {splits!r}")
    else:
        bad_splits = [s for s in splits if not isinstance(s, str) or not s or ".." in PurePosixPath(s).parts
                      or PurePosixPath(s).is_absolute()]
        if bad_splits:
            problems.append(f"split names must be folder names under img_dir/ and ann_dir/, got "
                            f"{bad_splits!r}")
        if len(set(map(str, splits))) != len(splits):
            problems.append(f"splits are listed more than once: {list(splits)!r}")
    for label, suffix, optional in (("img_suffix", img_suffix, True),
                                    ("seg_map_suffix", seg_map_suffix, False)):
        if suffix is None and optional:
            continue
        if not isinstance(suffix, str) or not suffix:
            problems.append(f"{label} must be a non-empty file-name ending such as '.png', got {suffix!r}")
    return problems


def _is_colour(c: Any) -> bool:
    return (isinstance(c, Sequence) and not isinstance(c, str) and len(c) == 3
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255
                    for v in c))


@dataclass(frozen=True)
class FolderDataset:
    """A segmentation dataset stored as image/mask folders in the mmseg layout.

    Attributes:
        root: the folder holding ``img_dir/`` and ``ann_dir/``.
        classes: class names; label value ``i`` is ``classes[i]``.
        palette: one ``(r, g, b)`` colour per class, or None.
        splits: the split folders under ``img_dir/`` and ``ann_dir/``.
        img_suffix: file-name ending of the images; None accepts ``.png``, ``.jpg`` and
            ``.jpeg`` in any letter case.
        seg_map_suffix: file-name ending of the masks.
        reduce_zero_label: mask value 0 means "ignore" and value ``v`` means class ``v - 1``.
        ignore_index: the label value of pixels that carry no class.

    Raises:
        FolderDatasetError: invalid settings (no classes, duplicate names, a palette whose
            length differs from the classes, bad splits or suffixes).
    """

    root: Path
    classes: Tuple[str, ...]
    palette: Optional[Tuple[Colour, ...]] = None
    splits: Tuple[str, ...] = ("train", "val")
    img_suffix: Optional[str] = None
    seg_map_suffix: str = ".png"
    reduce_zero_label: bool = False
    ignore_index: int = 255

    def __post_init__(self) -> None:
        root_ok = isinstance(self.root, (str, os.PathLike))
        problems = [] if root_ok else [f"root must be a path, got {self.root!r}"]
        problems += _spec_problems(self.classes, self.palette, self.splits, self.img_suffix,
                                   self.seg_map_suffix, self.ignore_index)
        if problems:
            raise FolderDatasetError(problems, self.root if root_ok else None)
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "reduce_zero_label", bool(self.reduce_zero_label))
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in self.palette))

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.classes)

    def img_dir(self, split: str) -> Path:
        """The image folder of ``split``."""
        return self.root / "img_dir" / split

    def ann_dir(self, split: str) -> Path:
        """The mask folder of ``split``."""
        return self.root / "ann_dir" / split


def _missing_root_problem(root: Path) -> str:
    return (f"the dataset root {root} does not exist (or is not a folder); give the folder that "
            f"holds img_dir/<split>/ and ann_dir/<split>/")


def _read_classes_file(root: Path) -> Tuple[Optional[List[Any]], Optional[List[Any]], List[str]]:
    """Class names and palette from ``classes.json`` / ``classes.txt`` in ``root``."""
    problems: List[str] = []
    found: Dict[str, List[Any]] = {}
    palette: Optional[List[Any]] = None
    jpath, tpath = root / CLASSES_JSON, root / CLASSES_TXT
    if jpath.is_file():
        form = ('a JSON list of class names, or an object {"classes": [...], '
                '"palette": [[r, g, b], ...]}')
        try:
            data = json.loads(jpath.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{jpath} is not valid JSON ({exc}); it must hold {form}")
        else:
            if isinstance(data, list):
                found[CLASSES_JSON] = data
            elif isinstance(data, dict) and isinstance(data.get("classes"), list):
                found[CLASSES_JSON] = data["classes"]
                palette = data.get("palette")
                unknown = sorted(set(data) - {"classes", "palette"})
                if unknown:
                    _logger.debug("%s: ignoring keys %s", jpath, unknown)
            else:
                problems.append(f"{jpath} must hold {form}; it holds a {type(data).__name__}")
    if tpath.is_file():
        try:
            lines = tpath.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{tpath} cannot be read as UTF-8 text ({exc}); write one class name per line")
        else:
            found[CLASSES_TXT] = [ln.strip() for ln in lines if ln.strip()]
    if len(found) == 2 and found[CLASSES_JSON] != found[CLASSES_TXT]:
        problems.append(f"{jpath} and {tpath} list different classes "
                        f"({found[CLASSES_JSON]!r} vs {found[CLASSES_TXT]!r}); delete one of them")
    classes = found.get(CLASSES_JSON, found.get(CLASSES_TXT))
    return classes, palette, problems


def describe_folder_dataset(root: PathLike, classes: Optional[Sequence[str]] = None,
                            splits: Sequence[str] = ("train", "val"),
                            img_suffix: Optional[str] = None, seg_map_suffix: str = ".png",
                            reduce_zero_label: bool = False,
                            palette: Optional[Sequence[Sequence[int]]] = None) -> FolderDataset:
    """Describe the folder dataset at ``root`` (its files are not checked; see
    :func:`check_folder_dataset`).

    Args:
        root: the folder holding ``img_dir/`` and ``ann_dir/``.
        classes: class names, label value ``i`` being ``classes[i]``. None: read
            ``<root>/classes.json`` (a JSON list of names, or ``{"classes": [...],
            "palette": [[r, g, b], ...]}``), else ``<root>/classes.txt`` (one name per line,
            blank lines ignored).
        splits: the split folders.
        img_suffix: file-name ending of the images; None accepts ``.png``, ``.jpg``, ``.jpeg``
            in any letter case.
        seg_map_suffix: file-name ending of the masks.
        reduce_zero_label: mask value 0 means "ignore", value ``v`` means class ``v - 1``.
        palette: one ``[r, g, b]`` colour per class; overrides the palette of ``classes.json``.

    Raises:
        FolderDatasetError: ``root`` is missing; no classes were given or found; invalid
            classes, palette, splits or suffixes. Every problem found is listed.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FolderDatasetError([_missing_root_problem(root)], root)
    problems: List[str] = []
    if classes is None:
        classes, file_palette, problems = _read_classes_file(root)
        if palette is None:
            palette = file_palette
        if classes is None and not problems:
            problems.append(
                f"no class names: pass classes=[...], or write {root / CLASSES_JSON} (a JSON list of "
                f'names, or {{"classes": [...], "palette": [[r, g, b], ...]}}), or write '
                f"{root / CLASSES_TXT} (one name per line)")
    if classes is not None:
        problems += _spec_problems(classes, palette, splits, img_suffix, seg_map_suffix, 255)
    if problems:
        raise FolderDatasetError(problems, root)
    assert classes is not None
    return FolderDataset(root=root, classes=tuple(classes),
                         palette=None if palette is None else tuple(tuple(c) for c in palette),
                         splits=tuple(splits), img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label)
