"""Segment images with a prompt checkpoint: per image a class-index PNG, a colour-coded mask
and an overlay.

    python tools/infer.py CONFIG PROMPTS.safetensors [--images PATH] [--out-dir DIR]
                          [--outputs labels mask overlay] [--strict] [--opacity 0.5]
                          [--device cpu] [--cfg-options k=v ...]

The model is built from the config, the frozen backbone's own pretrained weights are loaded
(``init_cfg`` / the TimmBackbone weights file), then the prompts; prompts that belong to
another backbone, class set or method config are refused with the field that differs.
Images go through the config's test pipeline (resize, without annotations) and the model's
data preprocessor, and are segmented as in testing (``model.test_cfg``: whole image or
sliding window); predictions are resized back to each image's own size.

``--images`` is an image file or a folder of images (default: the config's test images).
For each image ``NAME.ext`` the tool writes into ``--out-dir`` (default
``work_dirs/<config name>/infer``) ``NAME_labels.png`` (each pixel's class index, a palette PNG:
what a dataset folder's ``ann_dir`` takes back for training), ``NAME_mask.png`` (one colour per
class) and ``NAME_overlay.png`` (the image blended with the mask, ``--opacity`` of the mask);
``--outputs`` picks some. Also ``palette.json`` (class name -> colour). Colours are the
dataset's palette (the config's test dataset metainfo) when it has one per class, otherwise a
fixed palette. Each image's files are written (atomically) as soon as it is segmented.

An image that cannot be read (a truncated file, not an image) is skipped with a warning and
listed at the end, with exit status 1; ``--strict`` decodes every image first and refuses the
run, naming each unreadable one. The options are :func:`promptmatch.visualize.infer_config_parser`'s
(``tools/infer.py --help`` works without the mmseg stack).
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


import numpy as np

from promptmatch.mmseg.inference import dataset_metainfo, test_dataset_cfg  # noqa: E402

from promptmatch.visualize import (  # noqa: E402,F401  (their home; imported here by older callers)
    IMAGE_SUFFIXES, MaskWriter, UnreadableImageError, blend, colorize, find_images, finish, fixed_palette,
    infer_config_parser, make_palette, output_stems, read_checked_bytes, refuse_unreadable, segment_images,
    write_mask_and_overlay, write_palette,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    return infer_config_parser(prog="promptmatch.mmseg.cli.infer").parse_args(argv)


# ------------------------------------------------------------------ inputs
def default_image_dir(cfg: Any) -> Optional[str]:
    """The config's test image folder (``data_root`` / ``data_prefix.img_path``), if any."""
    ds = test_dataset_cfg(cfg)
    if ds is None:
        return None
    prefix = (ds.get("data_prefix") or {}).get("img_path", "")
    root = ds.get("data_root") or ""
    return osp.join(root, prefix) if (root or prefix) else None


# ------------------------------------------------------------------- model
def build_model(cfg: Any, checkpoint: str, device: str) -> Any:
    """The config's promptmatch model with its backbone weights and the prompts loaded, in eval mode
    (:func:`promptmatch.mmseg.init_model`); errors become messages."""
    from mmengine.logging import print_log

    from promptmatch.checkpoint import PromptMismatchError
    from promptmatch.mmseg.inference import init_model

    try:
        model = init_model(cfg, checkpoint, device)
    except FileNotFoundError as err:  # the backbone's weights (init_cfg, TimmBackbone's file)
        raise SystemExit(f"error: the backbone's pretrained weights are missing: {err}") from None
    except (PromptMismatchError, TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print_log(f"promptmatch: prompts loaded from {checkpoint}", logger="current", level=logging.INFO)
    return model


def build_pipeline(cfg: Any) -> Any:
    """The config's test pipeline for in-memory images, without annotation loading."""
    from mmengine.dataset import Compose

    ds = test_dataset_cfg(cfg)
    steps = list((ds or {}).get("pipeline") or cfg.get("test_pipeline") or [])
    kept = []
    for step in steps:
        kind = str(step.get("type", ""))
        if kind.endswith("LoadAnnotations"):
            continue
        if "LoadImageFrom" in kind:
            step = dict(type="LoadImageFromNDArray")
        kept.append(dict(step))
    if not kept or kept[0]["type"] != "LoadImageFromNDArray":
        kept.insert(0, dict(type="LoadImageFromNDArray"))
    if not str(kept[-1].get("type", "")).endswith("PackSegInputs"):
        kept.append(dict(type="PackSegInputs"))
    return Compose(kept)


def segment(model: Any, pipeline: Any, image_bgr: np.ndarray) -> np.ndarray:
    """Class indices (H, W) of one BGR image at its own size."""
    import torch

    packed = pipeline(dict(img=image_bgr))
    data = dict(inputs=[packed["inputs"]], data_samples=[packed["data_samples"]])
    with torch.no_grad():
        (result,) = model.test_step(data)
    return result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)


def read_rgb_as_mmcv(path: Path) -> np.ndarray:
    """The image at ``path`` as mmcv reads it for the test pipeline (OpenCV, EXIF orientation
    applied), in RGB, after Pillow has decoded all of it: OpenCV fills a truncated file with
    grey instead of failing. :class:`UnreadableImageError` naming the file otherwise."""
    import mmcv

    data = read_checked_bytes(path)
    image_bgr = mmcv.imfrombytes(data, flag="color")
    if image_bgr is None:
        raise UnreadableImageError(path, "OpenCV cannot decode it")
    return mmcv.bgr2rgb(image_bgr)


# -------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (0; 1 when an image was skipped)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from these tools
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from mmengine.config import Config

    from promptmatch.checkpoint import read_prompt_metadata

    if not args.checkpoint.endswith((".safetensors", ".pth")):
        raise SystemExit(
            f"error: {args.checkpoint!r} is neither a prompt checkpoint (.safetensors; training writes "
            "<work_dir>/prompts.safetensors) nor an mmengine Runner checkpoint (.pth)"
        )
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint!r} does not exist")
    if not osp.isfile(args.config):
        raise SystemExit(f"error: config {args.config!r} does not exist")
    meta = {}
    if args.checkpoint.endswith(".safetensors"):
        try:
            meta = read_prompt_metadata(args.checkpoint)  # fails early on a foreign file
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    source = args.images or default_image_dir(cfg)
    if source is None:
        raise SystemExit("error: the config names no test images; give an image file or folder with --images")
    images = find_images(source)
    if args.strict:
        refuse_unreadable(images)
    out_dir = Path(args.out_dir or osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0], "infer"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    model = build_model(cfg, args.checkpoint, device)
    pipeline = build_pipeline(cfg)
    metainfo = dataset_metainfo(cfg)
    palette = make_palette(model.num_classes, metainfo)
    names = model.class_names or meta.get("class_names") or [str(i) for i in range(model.num_classes)]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_palette(out_dir, names, palette)

    def segment_rgb(path: Path, rgb: np.ndarray) -> np.ndarray:
        return segment(model, pipeline, np.ascontiguousarray(rgb[:, :, ::-1]))

    writer = MaskWriter(out_dir, palette, args.outputs, args.opacity)
    written, skipped = segment_images(images, segment_rgb, writer, names, read=read_rgb_as_mmcv)
    return finish(written, skipped, args.checkpoint, out_dir)


if __name__ == "__main__":
    sys.exit(main())
