"""Checking a folder dataset on disk: pairing images with masks, reading every file, and
reporting every problem found at once (:func:`check_folder_dataset`, :func:`folder_pairs`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ...constants import DATASET_IMAGE_SUFFIXES
from .layout import FolderDataset, FolderDatasetError, _missing_root_problem

__all__ = ["check_folder_dataset", "folder_pairs", "folder_image_sizes", "sizes_listing"]

_logger = logging.getLogger(__name__)

#: extensions of files that look like images: such a file that does not match the expected
#: suffix is reported (it would otherwise be silently left out of the dataset)
_IMAGE_LIKE = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                         ".ppm", ".pgm", ".pbm", ".jp2", ".heic"})


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
                img_sfx=ds.img_suffix or "/".join(DATASET_IMAGE_SUFFIXES), seg=ds.seg_map_suffix,
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
        if ext.lower() in DATASET_IMAGE_SUFFIXES and len(rel) > len(ext):
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
def _shorten(text: str, limit: int) -> str:
    """``text`` cut at the last word boundary before ``limit`` characters and ended with
    ``...`` when longer (a word is cut only if it alone is longer than half the limit)."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 2)
    if cut < limit // 2:
        cut = limit - 3
    return text[:cut].rstrip(" ,;:") + "..."


def _describe_exc(exc: BaseException, path: Path) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".replace(str(path), path.name).split())
    return _shorten(text, 160)


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


def folder_image_sizes(ds: FolderDataset, split: str) -> Dict[Tuple[int, int], List[str]]:
    """``{(width, height): [image files relative to img_dir/<split>]}`` of one split, read from
    the file headers (nothing decoded); an image that cannot be read is left out (it is a
    problem of its own: :func:`check_folder_dataset`).

    Raises:
        FolderDatasetError: the split's files do not pair up (see :func:`folder_pairs`).
    """
    from PIL import Image

    sizes: Dict[Tuple[int, int], List[str]] = {}
    for img, _ in folder_pairs(ds, split):
        try:
            with Image.open(img) as im:
                size = tuple(im.size)
        except Exception:  # anything PIL raises on a broken file: reported by the checks
            continue
        sizes.setdefault(size, []).append(img.relative_to(ds.img_dir(split)).as_posix())  # type: ignore[arg-type]
    return sizes


def sizes_listing(sizes: Dict[Tuple[int, int], List[str]]) -> str:
    """``"64x64 (3 images, e.g. a.png), 48x32 (1 image, e.g. b.png)"``: the sizes of
    :func:`folder_image_sizes`, the most common first."""
    return ", ".join(f"{_size_str(s)} ({len(names)} image{'s' if len(names) != 1 else ''}, e.g. {names[0]})"
                     for s, names in sorted(sizes.items(), key=lambda kv: (-len(kv[1]), kv[0])))


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
