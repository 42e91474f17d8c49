"""Segment images with a merged segmentor file (no mmseg needed), through :func:`promptmatch.predict`.

    python -m promptmatch.predict_cli SEGMENTOR.safetensors --images PATH [--out-dir DIR]
        [--outputs labels mask overlay] [--strict] [--mode whole|slide --crop H W --stride H W]
        [--flip] [--amp bf16] [--opacity 0.5]
    python tools/infer.py --segmentor SEGMENTOR.safetensors --images PATH [...]   # the same

``SEGMENTOR.safetensors`` is written by :func:`promptmatch.save_segmentor` (backbone and
prompts in one file). For each image ``NAME.ext`` it writes into ``--out-dir`` (default
``work_dirs/predict``) ``NAME_labels.png`` (each pixel's class index, a palette PNG: what a
dataset folder's ``ann_dir`` takes back for training), ``NAME_mask.png`` (one colour per class)
and ``NAME_overlay.png`` (``--outputs`` picks some), and ``palette.json`` (class name ->
colour). Each image's files are written as soon as it is predicted. An image that cannot be
read is skipped with a warning and listed at the end (exit status 1); ``--strict`` checks every
image first and refuses the run, naming each unreadable one.

:func:`infer_main` is ``tools/infer.py``: ``--segmentor`` comes here, ``CONFIG PROMPTS`` goes
to :mod:`promptmatch.mmseg.cli.infer` (whose ``--help`` works without the mmseg stack).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "infer_main"]

_logger = logging.getLogger(__name__)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""

    from promptmatch.visualize import add_output_arguments

    p = argparse.ArgumentParser(
        prog="promptmatch.predict_cli",
        description="Segment images with a merged segmentor file (promptmatch.save_segmentor); needs no mmseg",
        epilog="Exit status: 0 when every image was segmented; 1 when an image could not be read (skipped, "
               "listed at the end) or the run was refused.")
    p.add_argument("segmentor", nargs="?", help="the merged segmentor file (.safetensors)")
    p.add_argument("--segmentor", dest="segmentor_opt", help=argparse.SUPPRESS)  # tools/infer.py's spelling
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    add_output_arguments(p, "where to write the outputs (default: work_dirs/predict)")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="sliding-window crop (mode slide)")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="sliding-window stride (mode slide)")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype")
    args = p.parse_args(argv)
    args.segmentor = args.segmentor or args.segmentor_opt
    if not args.segmentor:
        p.error("give the merged segmentor file")
    args.out_dir = args.out_dir or "work_dirs/predict"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from this tool
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np
    import torch

    import promptmatch as pm
    from promptmatch.visualize import MaskWriter, find_images, finish, make_palette, refuse_unreadable, \
        segment_images, write_palette

    if not Path(args.segmentor).is_file():
        raise SystemExit(f"error: segmentor file {args.segmentor!r} does not exist")
    images = find_images(args.images)
    if args.strict:
        refuse_unreadable(images)
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = pm.load_segmentor(args.segmentor, device=device)
    except (pm.PromptMismatchError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    meta = pm.read_segmentor_metadata(args.segmentor)
    k = model.num_classes
    names = list(meta.get("segmentor", {}).get("class_names") or [str(i) for i in range(k)])
    palette = make_palette(k, {})
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_palette(out_dir, names, palette)

    def segment(path: Path, rgb: "np.ndarray") -> "np.ndarray":
        return pm.predict(model, rgb, mode=args.mode, crop=args.crop, stride=args.stride, flip=args.flip,
                          amp=args.amp, progress=False).cpu().numpy()

    writer = MaskWriter(out_dir, palette, args.outputs, args.opacity)
    written, skipped = segment_images(images, segment, writer, names)
    return finish(written, skipped, args.segmentor, out_dir)


def _wants_segmentor(argv: Sequence[str]) -> bool:
    return any(a == "--segmentor" or a.startswith("--segmentor=") for a in argv)


def infer_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/infer.py``: a merged segmentor file (``--segmentor FILE``: :func:`main`, no mmseg)
    or an mmseg config and prompt checkpoint (:mod:`promptmatch.mmseg.cli.infer`). Without the
    mmseg stack, ``--help`` and usage errors of the config form still work; running it says
    what to install and that ``--segmentor`` needs nothing more."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if _wants_segmentor(args):
        return main(args)
    from promptmatch.stack import mmseg_stack_error

    error = mmseg_stack_error()
    if error is None:
        from promptmatch.mmseg.cli.infer import main as config_main

        return config_main(args)
    from promptmatch.visualize import infer_config_parser

    infer_config_parser().parse_args(args)  # --help, usage errors
    raise SystemExit(f"error: segmenting with an mmseg config and prompt checkpoint needs the mmseg stack. {error}\n"
                     "A merged segmentor file needs none of it: tools/infer.py --segmentor FILE --images PATH")


if __name__ == "__main__":
    sys.exit(main())
