"""Building offline datasets: writing them, verifying them against their manifest, and
replacing a broken copy under a lock."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np
import PIL
from PIL import Image

from ..._locking import exclusive_lock
from ..._wheels import cache_base
from .scenes import _SCENE_MAKERS
from .shifts import SHIFT_REGISTRY, SPLITS
from .sources import _SOURCES, GUARD_PX, PathLike, _SourceBank
from .specs import IGNORE_INDEX, IMAGE_SIZE, OfflineDatasetSpec, _get_spec

__all__ = [
    "BUILD_VERSION",
    "DATA_ENV",
    "default_data_root",
    "build_offline_dataset",
    "verify_offline_dataset",
]

_logger = logging.getLogger(__name__)

#: Bump whenever the generated content changes; datasets built by another version are rebuilt.
BUILD_VERSION = 2
DATA_ENV = "PROMPTMATCH_DATA"
_PNG_COMPRESS_LEVEL = 1  # zlib level: 3x faster than 6 for ~10% larger files
# recorded in meta.json as the generator: the package, whose layout is not part of the content
_GENERATOR_MODULE = __name__.rpartition(".")[0]
# random streams of the scene generator: train scenes, val scenes, then 10 + i for the i-th
# entry of SHIFT_REGISTRY
_TRAIN_STREAM, _VAL_STREAM, _FIRST_SHIFT_STREAM = 0, 1, 10


def default_data_root() -> Path:
    """Where datasets are built when no root is given: ``$PROMPTMATCH_DATA``, else
    ``$PROMPTMATCH_CACHE/datasets``, else ``~/.cache/promptmatch/datasets``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else cache_base() / "datasets"


def _rng(spec: OfflineDatasetSpec, stream: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, stream, index])))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _class_sources(spec: OfflineDatasetSpec) -> Optional[Dict[str, Any]]:
    """Source key per class for ``meta.json`` (a list where several sources fill a class)."""
    if spec.kind == "tiles":
        return None
    out: Dict[str, Any] = dict(zip(spec.classes, spec.sources))
    if spec.background_sources:
        out[spec.classes[0]] = list(spec.background_sources)
    return out


def _build_into(spec: OfflineDatasetSpec, out: Path) -> Dict[str, Any]:
    bank = _SourceBank()
    keys = list(spec.all_sources)
    areas = {k: _SOURCES[k].areas() for k in keys}
    for k in keys:
        bank.raw(k)  # fail early (missing wheel, bad checksum) before writing anything
    make = _SCENE_MAKERS[spec.kind]
    files: Dict[str, str] = {}
    content = hashlib.sha256()
    samples: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SPLITS}

    def write(split: str, idx: str, img: np.ndarray, label: np.ndarray) -> None:
        for sub, arr, mode in (("img_dir", img, "RGB"), ("ann_dir", label, "L")):
            rel = f"{sub}/{split}/{idx}.png"
            path = out / rel
            Image.fromarray(arr, mode).save(path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
            files[rel] = _sha256_file(path)
            content.update(rel.encode() + str(arr.shape).encode() + arr.tobytes())

    for split in SPLITS:
        (out / "img_dir" / split).mkdir(parents=True)
        (out / "ann_dir" / split).mkdir(parents=True)
    for split, stream, count in (("train", _TRAIN_STREAM, spec.num_train),
                                 ("val", _VAL_STREAM, spec.num_val)):
        area_idx = 0 if split == "train" else 1
        for i in range(count):
            idx = f"{i:04d}"
            scene = make(spec, _rng(spec, stream, i), i, {k: a[area_idx] for k, a in areas.items()})
            rendered = scene.render(bank)
            img, label, crops = rendered
            write(split, idx, img, label)
            samples[split].append({"id": idx, "crops": crops})
            if split != "val":
                continue
            for s_i, shift in enumerate(SHIFT_REGISTRY.values()):
                rng = _rng(spec, _FIRST_SHIFT_STREAM + s_i, i)
                (s_img, s_label, s_crops), params = shift.apply(scene, rendered, bank, rng)
                write(shift.split, idx, s_img, s_label)
                samples[shift.split].append({"id": idx, "crops": s_crops, "shift": params})

    sources = {}
    for k in keys:
        src = _SOURCES[k]
        train_area, val_area = areas[k]
        sources[k] = dict(bank.info(k), size=list(src.size), licence=src.licence,
                          attribution=src.attribution, scale=src.scale,
                          train_area=list(train_area), val_area=list(val_area))
    meta: Dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "build_version": BUILD_VERSION,
        "kind": spec.kind,
        "classes": list(spec.classes),
        "palette": [list(c) for c in spec.palette],
        "class_sources": _class_sources(spec),
        "ignore_index": IGNORE_INDEX,
        "reduce_zero_label": False,
        "img_suffix": ".png",
        "seg_map_suffix": ".png",
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "colour_mode": spec.colour_mode,
        "crop_px": list(spec.crop_px),
        "guard_px": GUARD_PX,
        "splits": {s: len(samples[s]) for s in SPLITS},
        "shifts": {name: shift.description for name, shift in SHIFT_REGISTRY.items()},
        "sources": sources,
        "generator": {"module": _GENERATOR_MODULE, "numpy": np.__version__,
                      "pillow": PIL.__version__,
                      "seed": spec.seed},
        "samples": samples,
        "content_sha256": content.hexdigest(),
        "files": dict(sorted(files.items())),
    }
    if spec.class_weights is not None:
        meta["class_weights"] = list(spec.class_weights)
    if spec.layout:
        meta["layout"] = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.layout.items()}
    meta["meta_sha256"] = _meta_digest(meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def _problems(path: Path, limit: int = 5) -> List[str]:
    """Why ``path`` is not a complete, intact offline dataset (empty list: it is)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return [f"{meta_path} is missing"]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{meta_path} is unreadable: {exc}"]
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return [f"{meta_path} has no file manifest"]
    if meta.get("meta_sha256") != _meta_digest(meta):
        return [f"{meta_path} was modified (its own checksum does not match)"]
    if meta.get("build_version") != BUILD_VERSION:
        return [f"built by version {meta.get('build_version')}, this is version {BUILD_VERSION}"]
    problems = []
    files: Dict[str, str] = meta["files"]
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif _sha256_file(f) != digest:
            problems.append(f"{rel} is corrupt (sha256 mismatch)")
        if len(problems) >= limit:
            return problems
    for sub in ("img_dir", "ann_dir"):
        for f in sorted((path / sub).rglob("*")):
            if f.is_file() and f.relative_to(path).as_posix() not in files:
                problems.append(f"{f.relative_to(path).as_posix()} is not in the manifest")
                if len(problems) >= limit:
                    return problems
    return problems


def verify_offline_dataset(path: PathLike) -> bool:
    """Whether ``path`` holds a complete, intact dataset built by this version.

    Checks that ``meta.json`` parses and matches its own checksum, that its build version is
    :data:`BUILD_VERSION`, that every file of its manifest exists with the recorded sha256,
    and that ``img_dir``/``ann_dir`` hold no file outside the manifest. Problems are logged
    at DEBUG level; this never raises for a broken dataset.
    """
    problems = _problems(Path(path))
    for p in problems:
        _logger.debug("%s: %s", path, p)
    return not problems


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    with open(root / f".{name}.lock", "a+") as fh, exclusive_lock(fh):
        yield


def build_offline_dataset(name: str, root: Optional[PathLike] = None, force: bool = False) -> Path:
    """Build dataset ``name`` under ``root`` (default :func:`default_data_root`) if needed.

    If ``<root>/<name>`` already verifies (:func:`verify_offline_dataset`) and ``force`` is
    false, it is returned at once. Otherwise the dataset is built into a temporary directory
    next to it and renamed into place (the broken copy, if any, is removed), so an
    interrupted build never leaves a directory that looks complete. Concurrent builds of
    the same dataset are serialised with a lock file ``<root>/.<name>.lock`` (POSIX).

    Args:
        name: one of :func:`list_offline_datasets`.
        root: directory holding the datasets.
        force: rebuild even if an intact copy exists.

    Returns:
        The dataset directory ``<root>/<name>``.

    Raises:
        ValueError: unknown ``name`` (the message lists the available datasets).
        SourceNotFoundError: scikit-image or (for ``nuclei``) the stardist wheel is missing;
            the message says how to get it.
        SourceChecksumError: the stardist wheel's data files are not the pinned ones.
    """
    spec = _get_spec(name)
    root = Path(root).expanduser() if root is not None else default_data_root()
    target = root / spec.name
    if not force and target.is_dir():
        problems = _problems(target)
        if not problems:
            return target
        _logger.warning("offline dataset %s failed verification (%s); rebuilding",
                        target, "; ".join(problems[:3]))
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, spec.name):
        if not force and target.is_dir() and not _problems(target):
            return target  # built by another process while we waited for the lock
        for stale in root.glob(f".{spec.name}.tmp-*"):  # left by killed builds; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(f".{spec.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # a plain mkdir (not tempfile.mkdtemp, whose 0700 would stay on the dataset): the
        # user's umask applies, as to any folder they make
        tmp = root / f".{spec.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(mode=0o777)
        t0 = time.perf_counter()
        try:
            meta = _build_into(spec, tmp)
            old = None
            if target.exists() or target.is_symlink():
                old = root / f".{spec.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    _logger.info("built offline dataset %s (%s) in %.1f s: %s", spec.name,
                 ", ".join(f"{k} {v}" for k, v in meta["splits"].items()),
                 time.perf_counter() - t0, target)
    return target
