"""Segment images with a merged segmentor file (no mmseg needed): per image a colour-coded
mask and an overlay, through :func:`promptmatch.predict`.

    python -m promptmatch.predict_cli SEGMENTOR.safetensors --images PATH [--out-dir DIR]
        [--mode whole|slide --crop H W --stride H W] [--flip] [--amp bf16] [--opacity 0.5]
    python tools/infer.py --segmentor SEGMENTOR.safetensors --images PATH [...]   # the same

``SEGMENTOR.safetensors`` is written by :func:`promptmatch.save_segmentor` (backbone and
prompts in one file). For each image ``NAME.ext`` it writes ``NAME_mask.png`` and
``NAME_overlay.png`` into ``--out-dir`` (default ``work_dirs/predict``), and
``palette.json`` (class name -> colour).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

_logger = logging.getLogger(__name__)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""

    from promptmatch.visualize import opacity_arg as opacity

    p = argparse.ArgumentParser(prog="promptmatch.predict_cli",
                                description="Segment images with a merged segmentor file (promptmatch.save_segmentor)")
    p.add_argument("segmentor", nargs="?", help="the merged segmentor file (.safetensors)")
    p.add_argument("--segmentor", dest="segmentor_opt", help=argparse.SUPPRESS)  # tools/infer.py's spelling
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    p.add_argument("--out-dir", default="work_dirs/predict", help="where to write masks and overlays")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="sliding-window crop (mode slide)")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="sliding-window stride (mode slide)")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype")
    p.add_argument("--opacity", type=opacity, default=0.5, help="weight of the mask in the overlay, in [0, 1]")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    args.segmentor = args.segmentor or args.segmentor_opt
    if not args.segmentor:
        p.error("give the merged segmentor file")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from this tool
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np
    import torch
    from PIL import Image

    import promptmatch as pm
    from promptmatch.visualize import find_images, make_palette, output_stems, write_mask_and_overlay, write_palette

    if not Path(args.segmentor).is_file():
        raise SystemExit(f"error: segmentor file {args.segmentor!r} does not exist")
    try:
        model = pm.load_segmentor(args.segmentor, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (pm.PromptMismatchError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    images = find_images(args.images)
    meta = pm.read_segmentor_metadata(args.segmentor)
    k = model.num_classes
    names = list(meta.get("segmentor", {}).get("class_names") or [str(i) for i in range(k)])
    palette = make_palette(k, {})
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_palette(out_dir, names, palette)
    try:
        preds = pm.predict(model, [str(p) for p in images], mode=args.mode, crop=args.crop, stride=args.stride,
                           flip=args.flip, amp=args.amp)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for path, stem, labels in zip(images, output_stems(images), preds):
        labels = labels.cpu().numpy()
        rgb = np.asarray(Image.open(path).convert("RGB"))
        write_mask_and_overlay(out_dir, stem, labels, rgb, palette, args.opacity)
        _logger.info("%s: %s", path.name, ", ".join(names[i] for i in np.unique(labels)))
    print(f"segmented {len(images)} image(s) with {args.segmentor}; masks and overlays in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
