"""User-supplied semantic-segmentation datasets stored as image/mask folders (mmseg layout).

The layout is the one mmsegmentation's ``BaseSegDataset`` reads::

    <root>/img_dir/<split>/<stem><img_suffix>       images (any mode; read as RGB)
    <root>/ann_dir/<split>/<stem><seg_map_suffix>   single-channel masks: class index per pixel,
                                                    255 = ignore
    <root>/classes.json or <root>/classes.txt       class names (optional: may be passed in)

Stems may contain sub-folders (``img_dir/train/city_a/0001.png`` pairs with
``ann_dir/train/city_a/0001.png``), as in mmseg. Files and folders whose name starts with a
dot are ignored. With ``reduce_zero_label=True`` mask value 0 means "ignore" and value ``v``
means class ``v - 1`` (mmseg's rule); the ignore value itself stays "ignore".

- :func:`describe_folder_dataset`: a :class:`FolderDataset` (root, classes, palette, splits,
  suffixes) from arguments or the classes file.
- :func:`check_folder_dataset`: every problem of the data on disk (missing folders, unmatched
  or unreadable files, size mismatches, colour masks, out-of-range labels), all reported in
  one :class:`FolderDatasetError`.
- :func:`folder_pairs`: the ``(image, mask)`` files of one split.
- :func:`load_folder_split`: one split as numpy arrays (for small in-memory benchmarks).
- :func:`export_offline_as_folder`: write a built-in offline dataset in this layout.

Only numpy, Pillow and the standard library are used; Pillow and tqdm are imported when
needed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "FolderDataset",
    "FolderDatasetError",
    "check_folder_dataset",
    "describe_folder_dataset",
    "export_offline_as_folder",
    "folder_pairs",
    "load_folder_split",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Colour = Tuple[int, int, int]

#: image suffixes accepted when ``img_suffix`` is None (compared case-insensitively)
_DEFAULT_IMG_SUFFIXES = (".png", ".jpg", ".jpeg")
#: extensions of files that look like images: such a file that does not match the expected
#: suffix is reported (it would otherwise be silently left out of the dataset)
_IMAGE_LIKE = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                         ".ppm", ".pgm", ".pbm", ".jp2", ".heic"})
_CLASSES_JSON = "classes.json"
_CLASSES_TXT = "classes.txt"
_PNG_COMPRESS_LEVEL = 1


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
    jpath, tpath = root / _CLASSES_JSON, root / _CLASSES_TXT
    if jpath.is_file():
        form = ('a JSON list of class names, or an object {"classes": [...], '
                '"palette": [[r, g, b], ...]}')
        try:
            data = json.loads(jpath.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{jpath} is not valid JSON ({exc}); it must hold {form}")
        else:
            if isinstance(data, list):
                found[_CLASSES_JSON] = data
            elif isinstance(data, dict) and isinstance(data.get("classes"), list):
                found[_CLASSES_JSON] = data["classes"]
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
            found[_CLASSES_TXT] = [ln.strip() for ln in lines if ln.strip()]
    if len(found) == 2 and found[_CLASSES_JSON] != found[_CLASSES_TXT]:
        problems.append(f"{jpath} and {tpath} list different classes "
                        f"({found[_CLASSES_JSON]!r} vs {found[_CLASSES_TXT]!r}); delete one of them")
    classes = found.get(_CLASSES_JSON, found.get(_CLASSES_TXT))
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
                f"no class names: pass classes=[...], or write {root / _CLASSES_JSON} (a JSON list of "
                f'names, or {{"classes": [...], "palette": [[r, g, b], ...]}}), or write '
                f"{root / _CLASSES_TXT} (one name per line)")
    if classes is not None:
        problems += _spec_problems(classes, palette, splits, img_suffix, seg_map_suffix, 255)
    if problems:
        raise FolderDatasetError(problems, root)
    assert classes is not None
    return FolderDataset(root=root, classes=tuple(classes),
                         palette=None if palette is None else tuple(tuple(c) for c in palette),
                         splits=tuple(splits), img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label)


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class _Issue:
    """One problem with one file (or folder), before grouping."""

    kind: str
    where: str  # folder relative to the root, e.g. "img_dir/train"; "" for plain messages
    name: str  # file relative to ``where``; or the whole message for kind "plain"
    detail: str = ""
    values: Tuple[int, ...] = ()


# kind -> (singular, plural, fix); formatted with _context(ds)
_KINDS: Dict[str, Tuple[str, str, str]] = {
    "empty": ("split has no images", "",
              "put the {split} images ({img_sfx}) there, or leave {split!r} out of splits"),
    "no_mask": ("image has no mask", "images have no mask",
                "add a mask {ann}/<stem>{seg} with the same stem for each image, or remove the image"),
    "no_image": ("mask has no image", "masks have no image",
                 "add an image {img}/<stem>{img_sfx} with the same stem for each mask, or remove the mask"),
    "duplicate": ("stem has more than one file", "stems have more than one file",
                  "keep one file per stem (the pairing of image and mask is by stem)"),
    "stray_img": ("image file does not end with {img_sfx} and is left out",
                  "image files do not end with {img_sfx} and are left out",
                  "convert such files to {img_sfx}, set img_suffix to their ending, or move them out "
                  "of {img}"),
    "stray_mask": ("mask file does not end with {seg} and is left out",
                   "mask files do not end with {seg} and are left out",
                   "save masks as lossless {seg} class-index images (JPEG compression changes label "
                   "values), set seg_map_suffix to their ending, or move them out of {ann}"),
    "unreadable_img": ("image cannot be read", "images cannot be read",
                       "replace unreadable images with valid PNG/JPEG files, or remove them together "
                       "with their masks"),
    "unreadable_mask": ("mask cannot be read", "masks cannot be read",
                        "re-export unreadable masks as class-index PNGs, or remove them together with "
                        "their images"),
    "size": ("mask size differs from its image's", "masks differ in size from their images",
             "resize each mask to its image's size with nearest-neighbour interpolation "
             "(or check that the right image and mask share the stem)"),
    "channels": ("mask is not a single-channel class-index image",
                 "masks are not single-channel class-index images",
                 "convert colour masks to class-index PNGs (mode L or P): each pixel's value is its "
                 "class index, {ignore} = ignore"),
    "labels": ("mask has label values that are neither {valid}",
               "masks have label values that are neither {valid}",
               "map such values to class indices or to the ignore value {ignore}, or fix the class list "
               "({n} classes){rzl_hint}"),
}


def _context(ds: FolderDataset, where: str) -> Dict[str, Any]:
    parts = where.split("/", 1)
    split = parts[1] if len(parts) == 2 else ""
    n, ignore = ds.num_classes, ds.ignore_index
    if ds.reduce_zero_label:
        valid = f"1..{n} (classes 0..{n - 1} under reduce_zero_label) nor 0 or {ignore} (ignore)"
        rzl_hint = ("; reduce_zero_label=True shifts every value down by one and makes 0 'ignore': "
                    "set it to False if your masks already start at class 0")
    else:
        valid = f"class indices 0..{n - 1} nor the ignore value {ignore}"
        rzl_hint = ("; if your masks use 0 for 'unlabelled' and 1..N for the classes, pass "
                    "reduce_zero_label=True")
    return dict(split=split, img=f"img_dir/{split}", ann=f"ann_dir/{split}",
                img_sfx=ds.img_suffix or "/".join(_DEFAULT_IMG_SUFFIXES), seg=ds.seg_map_suffix,
                ignore=ignore, n=n, valid=valid, rzl_hint=rzl_hint)


def _example(issue: _Issue) -> str:
    return f"{issue.name} ({issue.detail})" if issue.detail else issue.name


def _format_issues(issues: Iterable[_Issue], ds: FolderDataset, max_examples: int) -> List[str]:
    """One message per (kind, folder): a count and up to ``max_examples`` file names."""
    groups: Dict[Tuple[str, str], List[_Issue]] = {}
    for issue in issues:
        groups.setdefault((issue.kind, issue.where), []).append(issue)
    lines: List[str] = []
    for (kind, where), items in groups.items():
        if kind == "plain":
            lines.extend(i.name for i in items)
            continue
        singular, plural, fix = (s.format(**_context(ds, where)) for s in _KINDS[kind])
        if len(items) == 1:
            item = items[0]
            head = f"{where}/{item.name}" if item.name else where
            detail = f" ({item.detail})" if item.detail else ""
            lines.append(f"{head}: {singular}{detail}; {fix}")
            continue
        shown = items[:max(0, max_examples)]
        examples = ", ".join(_example(i) for i in shown)
        more = len(items) - len(shown)
        if more:
            examples += (", ... and " if shown else "") + f"{more} more"
        extra = ""
        if kind == "labels":
            found = sorted({v for i in items for v in i.values})
            extra = f"; values found: {', '.join(map(str, found))}"
        lines.append(f"{where}: {len(items)} {plural}: {examples}{extra}; {fix}")
    return lines


# ----------------------------------------------------------------------------- scanning
def _list_files(folder: Path) -> List[str]:
    """Files under ``folder`` (recursive), as sorted posix paths relative to it; dot-files and
    dot-folders are skipped."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def _strip_suffix(rel: str, suffix: Optional[str]) -> Optional[str]:
    """The stem of ``rel`` if it ends with ``suffix`` (None: a default image suffix), else None."""
    if suffix is None:
        ext = PurePosixPath(rel).suffix
        if ext.lower() in _DEFAULT_IMG_SUFFIXES and len(rel) > len(ext):
            return rel[:-len(ext)]
        return None
    if rel.endswith(suffix) and len(rel) > len(suffix):
        return rel[:-len(suffix)]
    return None


def _index_folder(folder: Path, where: str, suffix: Optional[str], stray_kind: str
                  ) -> Tuple[Dict[str, str], List[_Issue]]:
    """``{stem: file}`` of the files in ``folder`` that end with ``suffix``, and the problems."""
    files: Dict[str, str] = {}
    issues: List[_Issue] = []
    for rel in _list_files(folder):
        stem = _strip_suffix(rel, suffix)
        if stem is None:
            if PurePosixPath(rel).suffix.lower() in _IMAGE_LIKE:
                issues.append(_Issue(stray_kind, where, rel))
            else:
                _logger.debug("%s/%s: not an image, skipped", folder, rel)
            continue
        if stem in files:
            issues.append(_Issue("duplicate", where, rel, f"same stem as {files[stem]}"))
            continue
        files[stem] = rel
    return files, issues


def _scan_split(ds: FolderDataset, split: str) -> Tuple[List[Tuple[Path, Path]], List[_Issue]]:
    """The matched ``(image, mask)`` pairs of ``split`` and the problems of its file lists."""
    img_d, ann_d = ds.img_dir(split), ds.ann_dir(split)
    img_w, ann_w = f"img_dir/{split}", f"ann_dir/{split}"
    issues: List[_Issue] = []
    missing = False
    for folder, what in ((img_d, "images"), (ann_d, "masks")):
        if not folder.is_dir():
            missing = True
            parent = folder.parent
            hint = ""
            if not parent.is_dir() and ds.root.is_dir():
                found = sorted(p.name for p in ds.root.iterdir() if p.is_dir() and not p.name.startswith("."))
                hint = (f" ({ds.root} has no {parent.name}/ folder; it holds "
                        f"{', '.join(f + '/' for f in found) if found else 'no folders'})")
            issues.append(_Issue("plain", "", f"missing folder {folder}{hint}: create it and put the "
                                              f"{split!r} {what} in it, or leave {split!r} out of splits"))
    images: Dict[str, str] = {}
    masks: Dict[str, str] = {}
    if img_d.is_dir():
        images, found_issues = _index_folder(img_d, img_w, ds.img_suffix, "stray_img")
        issues += found_issues
        if not images:
            issues.append(_Issue("empty", img_w, ""))
    if ann_d.is_dir():
        masks, found_issues = _index_folder(ann_d, ann_w, ds.seg_map_suffix, "stray_mask")
        issues += found_issues
    if missing:  # every file would be unmatched: the missing folder says it all
        return [], issues
    for stem in sorted(images):
        if stem not in masks:
            issues.append(_Issue("no_mask", img_w, images[stem]))
    for stem in sorted(set(masks) - set(images)):
        issues.append(_Issue("no_image", ann_w, masks[stem]))
    pairs = [(img_d / images[s], ann_d / masks[s]) for s in sorted(images) if s in masks]
    return pairs, issues


def folder_pairs(ds: FolderDataset, split: str) -> List[Tuple[Path, Path]]:
    """The ``(image, mask)`` files of ``split``, sorted by stem.

    Raises:
        FolderDatasetError: the root or a split folder is missing, the split holds no images,
            or some files have no partner (an image without a mask or a mask without an
            image), share a stem, or do not have the expected suffix. Every problem is listed.
    """
    if not ds.root.is_dir():
        raise FolderDatasetError([_missing_root_problem(ds.root)], ds.root)
    pairs, issues = _scan_split(ds, split)
    if issues:
        raise FolderDatasetError(_format_issues(issues, ds, 5), ds.root)
    return pairs


# ----------------------------------------------------------------------------- file content
def _describe_exc(exc: BaseException, path: Path) -> str:
    text = f"{type(exc).__name__}: {exc}".replace(str(path), path.name)
    return text if len(text) <= 160 else text[:157] + "..."


def _map_labels(raw: np.ndarray, ds: FolderDataset) -> np.ndarray:
    """Label values after the ``reduce_zero_label`` rule (int64)."""
    out = raw.astype(np.int64)
    if ds.reduce_zero_label:
        out = out - 1
        out[raw == 0] = ds.ignore_index
        out[raw == ds.ignore_index] = ds.ignore_index
    return out


def _bad_label_values(raw: np.ndarray, ds: FolderDataset) -> List[int]:
    """Raw mask values that are neither a class index nor the ignore index (after the rule)."""
    values = np.unique(raw)
    mapped = _map_labels(values, ds)
    bad = (mapped < 0) | ((mapped >= ds.num_classes) & (mapped != ds.ignore_index))
    return [int(v) for v in values[bad]]


def _mask_array(im: Any) -> np.ndarray:
    """The class-index array of a decoded single-channel mask image."""
    arr = np.asarray(im)
    return arr.astype(np.uint8) if arr.dtype == np.bool_ else arr


def _single_channel(im: Any) -> bool:
    return len(im.getbands()) == 1 and im.mode != "F"


def _channels_detail(im: Any) -> str:
    bands = im.getbands()
    return f"mode {im.mode}, {len(bands)} channel{'s' if len(bands) != 1 else ''}" + (
        ", float values" if im.mode == "F" else "")


def _size_str(size: Tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _rel(path: Path, ds: FolderDataset, split: str, sub: str) -> Tuple[str, str]:
    """``(folder relative to the root, file relative to that folder)`` of a file of ``split``."""
    return f"{sub}/{split}", path.relative_to(ds.root / sub / split).as_posix()


def _inspect_pair(ds: FolderDataset, split: str, img: Path, mask: Path, decode_mask: bool
                  ) -> List[_Issue]:
    """Problems of one image/mask pair: unreadable files, sizes, mask mode and labels. The
    image is checked from its header and PNG chunk checksums (other formats: decoded)."""
    from PIL import Image

    issues: List[_Issue] = []
    img_w, img_name = _rel(img, ds, split, "img_dir")
    ann_w, ann_name = _rel(mask, ds, split, "ann_dir")
    img_size = None
    try:
        with Image.open(img) as im:
            img_size = im.size
            fmt = im.format
            im.verify()
        if fmt != "PNG":  # verify() checks PNG chunk checksums only: decode the others (a truncated JPEG)
            with Image.open(img) as im:
                im.load()
    except Exception as exc:  # anything PIL raises on a broken file
        issues.append(_Issue("unreadable_img", img_w, img_name, _describe_exc(exc, img)))
    mask_size = None
    try:
        with Image.open(mask) as im:
            mask_size = im.size
            if not _single_channel(im):
                issues.append(_Issue("channels", ann_w, ann_name, _channels_detail(im)))
                im.verify()
            elif decode_mask:
                raw = _mask_array(im)
                bad = _bad_label_values(raw, ds)
                if bad:
                    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
                    issues.append(_Issue("labels", ann_w, ann_name, f"values {shown}", tuple(bad)))
            else:
                im.verify()
    except Exception as exc:  # anything PIL raises on a broken file
        issues = [i for i in issues if i.kind != "channels" or i.name != ann_name]
        issues.append(_Issue("unreadable_mask", ann_w, ann_name, _describe_exc(exc, mask)))
        mask_size = None
    if img_size is not None and mask_size is not None and img_size != mask_size:
        issues.append(_Issue("size", ann_w, ann_name,
                             f"mask {_size_str(mask_size)}, image {_size_str(img_size)}"))
    return issues


def check_folder_dataset(ds: FolderDataset, check_labels: bool = True, progress: bool = False,
                         max_examples: int = 5) -> Dict[str, int]:
    """Check every split of ``ds`` on disk and count its image/mask pairs.

    Finds: a missing root or split folder, an empty split, images without masks and masks
    without images (by stem), image-like files with the wrong suffix, two files with one stem,
    unreadable or corrupt files, masks whose size differs from their image's, masks that are
    not single-channel (e.g. RGB colour masks), and (when ``check_labels``) mask values that
    are neither a class index nor the ignore index under the ``reduce_zero_label`` rule.
    Image sizes come from the file headers; masks are decoded only when ``check_labels``.

    Args:
        ds: the dataset (see :func:`describe_folder_dataset`).
        check_labels: decode every mask and check its values.
        progress: show a progress bar (tqdm) over the pairs.
        max_examples: file names shown for a problem that affects many files.

    Returns:
        ``{split: number of image/mask pairs}``.

    Raises:
        FolderDatasetError: one error listing every problem found in all splits; its message
            starts with ``"folder dataset <root> has N problem(s):"``.
    """
    if not ds.root.is_dir():
        raise FolderDatasetError([_missing_root_problem(ds.root)], ds.root)
    issues: List[_Issue] = []
    counts: Dict[str, int] = {}
    todo: List[Tuple[str, Path, Path]] = []
    for split in ds.splits:
        pairs, split_issues = _scan_split(ds, split)
        issues += split_issues
        counts[split] = len(pairs)
        todo += [(split, img, mask) for img, mask in pairs]
    items: Iterable[Tuple[str, Path, Path]] = todo
    if progress:
        from tqdm import tqdm

        items = tqdm(todo, desc=f"checking {ds.root.name}", unit="pair", dynamic_ncols=True)
    for split, img, mask in items:
        issues += _inspect_pair(ds, split, img, mask, decode_mask=check_labels)
    if issues:
        raise FolderDatasetError(_format_issues(issues, ds, max_examples), ds.root)
    _logger.info("folder dataset %s is consistent: %s", ds.root,
                 ", ".join(f"{s} {n}" for s, n in counts.items()))
    return counts


# ----------------------------------------------------------------------------- loading
def load_folder_split(ds: FolderDataset, split: str, size: Optional[int] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """All images and labels of one split as arrays, in stem order.

    Args:
        ds: the dataset.
        split: the split folder.
        size: resize every image and mask to ``size x size`` (images bilinear, masks nearest);
            None: keep the sizes, which must then all be equal.

    Returns:
        ``(images, labels)``: uint8 arrays of shape ``(N, H, W, 3)`` (RGB) and ``(N, H, W)``
        (class indices or ``ds.ignore_index``, after the ``reduce_zero_label`` rule).

    Raises:
        FolderDatasetError: the split's files do not pair up (see :func:`folder_pairs`), a
            file cannot be read, a mask is not single-channel, differs in size from its image
            or holds values that are not labels, or (``size`` None) the images differ in size.
    """
    from PIL import Image

    if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    pairs = folder_pairs(ds, split)
    issues: List[_Issue] = []
    images: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    sizes: Dict[Tuple[int, int], List[str]] = {}
    for img_path, mask_path in pairs:
        img_w, img_name = _rel(img_path, ds, split, "img_dir")
        ann_w, ann_name = _rel(mask_path, ds, split, "ann_dir")
        rgb = raw = None
        try:
            with Image.open(img_path) as im:
                rgb = im.convert("RGB")
        except Exception as exc:  # anything PIL raises on a broken file
            issues.append(_Issue("unreadable_img", img_w, img_name, _describe_exc(exc, img_path)))
        try:
            with Image.open(mask_path) as im:
                if _single_channel(im):
                    raw = _mask_array(im)
                else:
                    issues.append(_Issue("channels", ann_w, ann_name, _channels_detail(im)))
        except Exception as exc:  # anything PIL raises on a broken file
            issues.append(_Issue("unreadable_mask", ann_w, ann_name, _describe_exc(exc, mask_path)))
        if rgb is None or raw is None:
            continue
        if (raw.shape[1], raw.shape[0]) != rgb.size:
            issues.append(_Issue("size", ann_w, ann_name, f"mask {_size_str((raw.shape[1], raw.shape[0]))}, "
                                                          f"image {_size_str(rgb.size)}"))
            continue
        bad = _bad_label_values(raw, ds)
        if bad:
            issues.append(_Issue("labels", ann_w, ann_name, f"values {', '.join(map(str, bad[:10]))}",
                                 tuple(bad)))
            continue
        label = Image.fromarray(_map_labels(raw, ds).astype(np.uint8))
        if size is not None:
            rgb = rgb.resize((int(size), int(size)), Image.Resampling.BILINEAR)
            label = label.resize((int(size), int(size)), Image.Resampling.NEAREST)
        sizes.setdefault(rgb.size, []).append(img_name)
        images.append(np.asarray(rgb, dtype=np.uint8))
        labels.append(np.asarray(label, dtype=np.uint8))
    if issues:
        raise FolderDatasetError(_format_issues(issues, ds, 5), ds.root)
    if len(sizes) > 1:
        listing = ", ".join(f"{_size_str(s)} ({len(names)} image{'s' if len(names) != 1 else ''}, "
                            f"e.g. {names[0]})"
                            for s, names in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        raise FolderDatasetError(
            [f"img_dir/{split}: the images have {len(sizes)} different sizes: {listing}; pass "
             f"size=<side> to resize every image to side x side"], ds.root)
    return np.stack(images), np.stack(labels)


# ----------------------------------------------------------------------------- export
def export_offline_as_folder(name: str, dest: PathLike, size: Optional[int] = None,
                             splits: Optional[Sequence[str]] = None, *,
                             data_root: Optional[PathLike] = None) -> Path:
    """Write the offline dataset ``name`` as a folder dataset at ``dest``.

    ``dest`` receives ``img_dir/<split>/*.png``, ``ann_dir/<split>/*.png`` and
    ``classes.json`` (``{"classes": [...], "palette": [...]}``), so that
    :func:`describe_folder_dataset` reads it without further arguments. The dataset is
    written into a temporary folder next to ``dest`` and renamed into place, so an
    interrupted export leaves no ``dest``.

    Args:
        name: an offline dataset (see ``list_offline_datasets``); built first if needed.
        dest: the folder to create; it must not exist or be empty.
        size: resize images (bilinear) and masks (nearest) to ``size x size``; None: copy the
            files unchanged.
        splits: the splits to write; None: all of the dataset's splits.
        data_root: where the offline datasets are built (default: their usual cache).

    Returns:
        ``dest``.

    Raises:
        FileExistsError: ``dest`` exists and is not an empty folder.
        ValueError: unknown dataset or split, or an invalid ``size``.
    """
    from PIL import Image

    from .offline import build_offline_dataset, dataset_classes, dataset_palette

    if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    dest = Path(dest).expanduser()
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
            raise FileExistsError(f"{dest} already exists and is not an empty folder; remove it or "
                                  f"choose another destination for the export of {name!r}")
    classes, palette = dataset_classes(name), dataset_palette(name)
    src = build_offline_dataset(name, data_root)
    available = json.loads((src / "meta.json").read_text())["splits"]
    wanted = list(available) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in available]
    if unknown or not wanted:
        raise ValueError(f"unknown or no splits {unknown or wanted!r} for offline dataset {name!r}; "
                         f"available: {', '.join(available)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")  # unique: concurrent exports
    tmp.mkdir()
    try:
        counts = {}
        for split in wanted:
            ids = sorted(p.name for p in (src / "img_dir" / split).glob("*.png"))
            for sub in ("img_dir", "ann_dir"):
                (tmp / sub / split).mkdir(parents=True)
            for file in ids:
                src_img, src_ann = src / "img_dir" / split / file, src / "ann_dir" / split / file
                out_img, out_ann = tmp / "img_dir" / split / file, tmp / "ann_dir" / split / file
                if size is None:
                    shutil.copyfile(src_img, out_img)
                    shutil.copyfile(src_ann, out_ann)
                    continue
                with Image.open(src_img) as im:
                    im.convert("RGB").resize((int(size), int(size)), Image.Resampling.BILINEAR).save(
                        out_img, compress_level=_PNG_COMPRESS_LEVEL)
                with Image.open(src_ann) as im:
                    im.resize((int(size), int(size)), Image.Resampling.NEAREST).save(
                        out_ann, compress_level=_PNG_COMPRESS_LEVEL)
            counts[split] = len(ids)
        (tmp / _CLASSES_JSON).write_text(json.dumps({"classes": classes, "palette": palette}, indent=1) + "\n",
                                         encoding="utf-8")
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); rename() cannot replace it everywhere
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info("exported offline dataset %s to %s (%s%s)", name, dest,
                 ", ".join(f"{s} {n}" for s, n in counts.items()),
                 f", {size}x{size}" if size is not None else "")
    return dest
