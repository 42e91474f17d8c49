"""Images in, coloured masks and overlays out: the helpers shared by the inference tools
(``tools/infer.py`` for mmseg configs, ``python -m promptmatch.predict_cli`` for a merged
segmentor file). numpy only (PIL where a tool writes images)."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .constants import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "opacity_arg", "find_images", "fixed_palette", "make_palette", "colorize", "blend",
           "output_stems", "write_palette", "write_mask_and_overlay"]


def opacity_arg(text: str) -> float:
    """An ``argparse`` type: a mask opacity in [0, 1]."""
    import argparse

    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"opacity must be in [0, 1], got {value}")
    return value


def find_images(path: str) -> List[Path]:
    """The image files named by ``path`` (a file, or a folder's images sorted by name)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SystemExit(f"error: images {str(p)!r} do not exist (give an image file or a folder with --images)")
    if p.is_file():
        return [p]
    images = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {str(p)!r}")
    return images


def fixed_palette(num_classes: int) -> np.ndarray:
    """``num_classes`` distinct, saturated RGB colours (the same for every run)."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        sat = 0.65 + 0.35 * ((i // 7) % 2)
        val = 0.95 - 0.3 * ((i // 3) % 2)
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


def make_palette(num_classes: int, metainfo: Dict[str, Any]) -> np.ndarray:
    """The dataset's palette (``num_classes`` x 3, RGB) if it has a colour per class, else
    :func:`fixed_palette`."""
    palette = metainfo.get("palette")
    if palette is not None:
        arr = np.asarray(palette)
        if arr.ndim == 2 and arr.shape[1] == 3 and arr.shape[0] >= num_classes:
            return np.clip(arr[:num_classes], 0, 255).astype(np.uint8)
    return fixed_palette(num_classes)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """An (H, W, 3) RGB image with each pixel coloured by its class."""
    return palette[labels]


def blend(image_rgb: np.ndarray, mask_rgb: np.ndarray, opacity: float) -> np.ndarray:
    """``image`` blended with ``mask``: (1 - opacity) * image + opacity * mask."""
    out = (1.0 - opacity) * image_rgb.astype(np.float32) + opacity * mask_rgb.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def output_stems(images: Sequence[Path]) -> List[str]:
    """One output name per image (the stem; the suffix added where two stems clash)."""
    stems = [p.stem for p in images]
    clash = {s for s in stems if stems.count(s) > 1}
    return [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if p.stem in clash else p.stem for p in images]


def write_palette(out_dir: Path, names: Sequence[Any], palette: np.ndarray) -> Path:
    """Write ``palette.json`` (class name -> RGB colour) into ``out_dir``; returns its path."""
    path = Path(out_dir) / "palette.json"
    path.write_text(json.dumps({str(n): [int(c) for c in palette[i]] for i, n in enumerate(names)}, indent=1) + "\n")
    return path


def write_mask_and_overlay(
    out_dir: Path, stem: str, labels: np.ndarray, image_rgb: np.ndarray, palette: np.ndarray, opacity: float
) -> Tuple[Path, Path]:
    """Write ``<stem>_mask.png`` (one colour per class) and ``<stem>_overlay.png`` (the image
    blended with the mask, ``opacity`` of the mask) into ``out_dir``; returns both paths."""
    from PIL import Image

    mask = colorize(labels, palette)
    mask_path, overlay_path = Path(out_dir) / f"{stem}_mask.png", Path(out_dir) / f"{stem}_overlay.png"
    Image.fromarray(mask).save(mask_path)
    Image.fromarray(blend(image_rgb, mask, opacity)).save(overlay_path)
    return mask_path, overlay_path
