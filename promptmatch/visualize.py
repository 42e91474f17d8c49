"""Images in, class maps and coloured masks out: what the folder prediction tools share
(``tools/infer.py`` for mmseg configs, ``python -m promptmatch.predict_cli`` for a merged
segmentor file): finding and reading images (every unreadable file named, none fatal), palettes,
the files written per image (each atomically, as soon as it is predicted), the options both
tools take and their summary. numpy only (PIL where images are read or written)."""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._atomic import atomic_write_bytes
from .constants import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "OUTPUTS", "UnreadableImageError", "opacity_arg", "find_images", "image_problem",
           "read_rgb", "read_checked_bytes", "refuse_unreadable", "fixed_palette", "make_palette", "colorize", "blend", "output_stems",
           "write_palette", "MaskWriter", "write_mask_and_overlay", "segment_images", "add_output_arguments",
           "infer_config_parser", "finish"]

_logger = logging.getLogger(__name__)

#: the files written per image ``NAME.ext`` (``--outputs``), by kind: the class-index PNG (each
#: pixel's value is its class index; what a dataset folder's ``ann_dir`` takes back for training),
#: the colour mask and the image blended with it
OUTPUTS: Dict[str, str] = {"labels": "{stem}_labels.png", "mask": "{stem}_mask.png", "overlay": "{stem}_overlay.png"}


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; ``path`` and ``reason`` name the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read image {str(path)!r}: {reason}")
        self.path = Path(path)
        self.reason = reason


def opacity_arg(text: str) -> float:
    """An ``argparse`` type: a mask opacity in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"opacity must be in [0, 1], got {value}")
    return value


def find_images(path: str) -> List[Path]:
    """The image files named by ``path``: a file, or a folder's image files (by suffix, hidden
    files skipped) sorted by name. ``SystemExit`` naming the path if there are none."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SystemExit(f"error: images {str(p)!r} do not exist (give an image file or a folder with --images)")
    if p.is_file():
        return [p]
    images = sorted(f for f in p.iterdir()
                    if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {str(p)!r}")
    return images


def _reason(exc: BaseException, path: Path) -> str:
    """Why ``path`` could not be read, in words, without the path itself."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (Pillow cannot identify its format)"
    if isinstance(exc, OSError) and exc.strerror:  # permission denied, is a directory, I/O error
        return exc.strerror[0].lower() + exc.strerror[1:]
    text = str(exc).replace(repr(str(path)), "it").replace(str(path), "it")
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text


def read_rgb(path: Path) -> np.ndarray:
    """The fully decoded image at ``path`` as a uint8 (H, W, 3) RGB array.

    Raises :class:`UnreadableImageError` (naming the file and why) for anything Pillow cannot
    decode: a truncated file, a file that is no image, one that cannot be opened.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # anything Pillow or the OS raises on a broken file
        raise UnreadableImageError(path, _reason(exc, path)) from None


def read_checked_bytes(path: Path) -> bytes:
    """The bytes of the image file at ``path``, after checking that Pillow decodes all of them
    (for readers that decode the bytes themselves, such as OpenCV, which fills a truncated
    image with grey instead of failing). :class:`UnreadableImageError` otherwise."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # anything Pillow or the OS raises on a broken file
        raise UnreadableImageError(path, _reason(exc, path)) from None
    return data


def image_problem(path: Path) -> Optional[str]:
    """Why the image at ``path`` cannot be read (decoding it completely), or None if it can."""
    try:
        read_checked_bytes(path)
    except UnreadableImageError as e:
        return e.reason
    return None


def _listing(problems: Sequence[Tuple[Path, str]]) -> str:
    return "\n".join(f"  {p}: {why}" for p, why in problems)


def refuse_unreadable(images: Sequence[Path]) -> None:
    """``--strict``: decode every image first; ``SystemExit`` naming every unreadable one (and
    why) before anything is predicted or written."""
    problems = [(p, why) for p in images for why in [image_problem(p)] if why is not None]
    if problems:
        raise SystemExit(
            f"error: --strict: {len(problems)} of {len(images)} image(s) cannot be read; nothing was predicted:\n"
            f"{_listing(problems)}\nReplace or remove them, or run without --strict to skip them with a warning.")


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
    text = json.dumps({str(n): [int(c) for c in palette[i]] for i, n in enumerate(names)}, indent=1) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _label_png(labels: np.ndarray, palette: np.ndarray) -> Any:
    """A class-index image: palette mode (pixel value = class index, shown in the class colours,
    as Pascal VOC's masks) for up to 256 classes, 16-bit grey beyond."""
    from PIL import Image

    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"class indices must be in [0, 65535] for a PNG, got {labels.min()}..{labels.max()}")
    if len(palette) > 256 or (labels.size and labels.max() > 255):
        return Image.fromarray(labels.astype(np.uint16))
    image = Image.fromarray(labels.astype(np.uint8))  # mode L; a palette makes it mode P
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    image.putpalette(flat.reshape(-1).tolist())
    return image


class MaskWriter:
    """Writes the chosen files of :data:`OUTPUTS` for each image into ``out_dir``, each one
    atomically (a crash leaves a whole file or none, never a part)."""

    def __init__(self, out_dir: Path, palette: np.ndarray, outputs: Sequence[str] = tuple(OUTPUTS),
                 opacity: float = 0.5) -> None:
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown or not outputs:
            raise ValueError(f"outputs must be some of {', '.join(OUTPUTS)}, got {list(outputs)}")
        self.out_dir = Path(out_dir)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.outputs = tuple(k for k in OUTPUTS if k in outputs)
        self.opacity = opacity

    def paths(self, stem: str) -> Dict[str, Path]:
        """The files written for an image whose output name is ``stem``, by kind."""
        return {k: self.out_dir / OUTPUTS[k].format(stem=stem) for k in self.outputs}

    def write(self, stem: str, labels: np.ndarray, image_rgb: Optional[np.ndarray] = None) -> Dict[str, Path]:
        """Write the files of one image's class map ``labels`` (H, W); ``image_rgb`` (H, W, 3)
        is needed for the overlay. Returns the paths written, by kind."""
        from PIL import Image

        labels = np.asarray(labels)
        paths = self.paths(stem)
        mask = colorize(labels, self.palette) if {"mask", "overlay"} & set(self.outputs) else None
        for kind, path in paths.items():
            if kind == "labels":
                image = _label_png(labels, self.palette)
            elif kind == "mask":
                image = Image.fromarray(mask)
            else:
                if image_rgb is None:
                    raise ValueError("the overlay needs the image")
                image = Image.fromarray(blend(image_rgb, mask, self.opacity))
            atomic_write_bytes(path, _png(image))
        return paths


def write_mask_and_overlay(
    out_dir: Path, stem: str, labels: np.ndarray, image_rgb: np.ndarray, palette: np.ndarray, opacity: float
) -> Tuple[Path, Path]:
    """Write ``<stem>_mask.png`` (one colour per class) and ``<stem>_overlay.png`` (the image
    blended with the mask, ``opacity`` of the mask) into ``out_dir``; returns both paths."""
    paths = MaskWriter(out_dir, palette, ("mask", "overlay"), opacity).write(stem, labels, image_rgb)
    return paths["mask"], paths["overlay"]


def segment_images(
    images: Sequence[Path],
    segment: Callable[[Path, np.ndarray], Any],
    writer: MaskWriter,
    names: Sequence[Any],
    read: Callable[[Path], np.ndarray] = read_rgb,
) -> Tuple[int, List[Tuple[Path, str]]]:
    """Read, segment and write each image in turn: ``read(path)`` -> RGB array (raising
    :class:`UnreadableImageError`), ``segment(path, rgb)`` -> class map (H, W), then ``writer``.

    An unreadable image is skipped with a warning; what was written stays whatever happens
    later. A ``ValueError`` of ``segment`` stops the run with a ``SystemExit`` naming the image.
    Returns the number of images written and the skipped ``(path, reason)`` pairs.
    """
    from tqdm.auto import tqdm

    written, skipped = 0, []
    for path, stem in tqdm(list(zip(images, output_stems(images))), desc="segment", unit="img", disable=None):
        try:
            rgb = read(path)
        except UnreadableImageError as e:
            _logger.warning("skipping %s: %s", path, e.reason)
            skipped.append((path, e.reason))
            continue
        try:
            labels = np.asarray(segment(path, rgb))
        except ValueError as e:
            raise SystemExit(f"error: {path}: {e}\n(the {written} image(s) before it were written to "
                             f"{writer.out_dir})") from None
        writer.write(stem, labels, rgb)
        written += 1
        _logger.info("%s: %s", path.name, ", ".join(str(names[i]) for i in np.unique(labels) if i < len(names)))
    return written, skipped


def finish(written: int, skipped: Sequence[Tuple[Path, str]], source: str, out_dir: Path) -> int:
    """Print the summary of a run of :func:`segment_images`; the exit status: 0, or 1 if an
    image was skipped (listed on stderr, each with its reason)."""
    print(f"segmented {written} image(s) with {source}; outputs in {out_dir}")
    if not skipped:
        return 0
    print(f"error: {len(skipped)} of {written + len(skipped)} image(s) could not be read and were skipped "
          f"(no outputs for them):\n{_listing(skipped)}\nReplace or remove them and run again (--strict checks "
          "every image before predicting any).", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------ options
def _outputs_arg(text: str) -> str:
    if text not in OUTPUTS:
        raise argparse.ArgumentTypeError(f"invalid output {text!r} (choose from {', '.join(OUTPUTS)})")
    return text


def add_output_arguments(parser: argparse.ArgumentParser, out_dir_help: str) -> None:
    """The options of both folder prediction tools: where and what to write, ``--strict``, the device."""
    parser.add_argument("--out-dir", help=out_dir_help)
    parser.add_argument(
        "--outputs", nargs="+", type=_outputs_arg, default=list(OUTPUTS), metavar="KIND",
        help="files per image NAME (default: all): labels = NAME_labels.png, the class index of each pixel "
             "(a palette PNG: what a dataset folder's ann_dir takes back for training); mask = NAME_mask.png, "
             "one colour per class; overlay = NAME_overlay.png, the image blended with the mask")
    parser.add_argument("--opacity", type=opacity_arg, default=0.5, help="weight of the mask in the overlay, in [0, 1]")
    parser.add_argument("--strict", action="store_true",
                        help="decode every image before predicting any and refuse the run, naming each unreadable "
                             "file (default: skip those with a warning, list them at the end, exit status 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


class _CfgOptions(argparse.Action):
    """mmengine's ``DictAction`` (``key=value`` config overrides), imported only when used, so
    that ``--help`` works without mmengine."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        try:
            from mmengine.config import DictAction
        except ImportError:
            parser.error(f"{option_string} needs mmengine (the mmseg stack: bash tools/setup_env.sh --mmseg)")
        DictAction(self.option_strings, self.dest, nargs=self.nargs)(parser, namespace, values, option_string)


def infer_config_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The options of ``tools/infer.py CONFIG PROMPTS`` (:mod:`promptmatch.mmseg.cli.infer`);
    building and using it needs no mmseg, so ``--help`` works without the stack."""
    p = argparse.ArgumentParser(
        prog=prog, description="Segment images with a prompt checkpoint and the mmseg config it was trained with",
        epilog="Without the mmseg stack, segment with a merged segmentor file instead (promptmatch.save_segmentor): "
               "tools/infer.py --segmentor FILE --images PATH [...] (python -m promptmatch.predict_cli --help). "
               "Exit status: 0 when every image was segmented, 1 when an image was skipped or the run refused.")
    p.add_argument("config", help="config file of the model the prompts were trained with")
    p.add_argument("checkpoint", help="prompt checkpoint (.safetensors) written by training, or an mmengine "
                   "Runner checkpoint (.pth) of a prompted model")
    p.add_argument("--images", help="an image file or a folder of images (default: the config's test images)")
    add_output_arguments(p, "where to write the outputs (default: work_dirs/<config>/infer)")
    p.add_argument("--cfg-options", nargs="+", action=_CfgOptions, metavar="KEY=VALUE",
                   help="override settings in the config")
    return p
