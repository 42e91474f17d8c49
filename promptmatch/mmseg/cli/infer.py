"""Segment images with a prompt checkpoint: per image, a colour-coded mask and an overlay.

    python tools/infer.py CONFIG PROMPTS.safetensors [--images PATH] [--out-dir DIR]
                          [--opacity 0.5] [--device cpu] [--cfg-options k=v ...]

The model is built from the config, the frozen backbone's own pretrained weights are loaded
(``init_cfg`` / the TimmBackbone weights file), then the prompts; prompts that belong to
another backbone, class set or method config are refused with the field that differs.
Images go through the config's test pipeline (resize, without annotations) and the model's
data preprocessor, and are segmented as in testing (``model.test_cfg``: whole image or
sliding window); predictions are resized back to each image's own size.

``--images`` is an image file or a folder of images (default: the config's test images).
For each image ``NAME.ext`` the tool writes ``NAME_mask.png`` (one colour per class) and
``NAME_overlay.png`` (the image blended with the mask, ``--opacity`` of the mask) into
``--out-dir`` (default ``work_dirs/<config name>/infer``), and ``palette.json`` (class name
-> colour). Colours are the dataset's palette (the config's test dataset metainfo) when it
has one per class, otherwise a fixed palette.
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
    IMAGE_SUFFIXES, blend, colorize, find_images, fixed_palette, make_palette, output_stems, write_mask_and_overlay,
    write_palette,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    from mmengine.config import DictAction

    from promptmatch.visualize import opacity_arg as opacity

    p = argparse.ArgumentParser(description="Segment images with a prompt checkpoint")
    p.add_argument("config", help="config file of the model the prompts were trained with")
    p.add_argument("checkpoint", help="prompt checkpoint (.safetensors) written by training, or an mmengine "
                   "Runner checkpoint (.pth) of a prompted model")
    p.add_argument("--images", help="an image file or a folder of images (default: the config's test images)")
    p.add_argument("--out-dir", help="where to write the masks and overlays (default: work_dirs/<config>/infer)")
    p.add_argument("--opacity", type=opacity, default=0.5, help="weight of the mask in the overlay, in [0, 1]")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override settings in the config")
    return p.parse_args(argv)


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


# -------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from these tools
    args = parse_args(argv)
    import mmcv
    import torch
    from mmengine.config import Config
    from mmengine.logging import print_log

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
    out_dir = Path(args.out_dir or osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0], "infer"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    model = build_model(cfg, args.checkpoint, device)
    pipeline = build_pipeline(cfg)
    metainfo = dataset_metainfo(cfg)
    palette = make_palette(model.num_classes, metainfo)
    names = model.class_names or meta.get("class_names") or [str(i) for i in range(model.num_classes)]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_palette(out_dir, names, palette)

    written = []
    for path, stem in zip(images, output_stems(images)):
        image_bgr = mmcv.imread(str(path), flag="color")
        if image_bgr is None:
            raise SystemExit(f"error: cannot read image {str(path)!r}")
        labels = segment(model, pipeline, image_bgr)
        mask_path, overlay_path = write_mask_and_overlay(out_dir, stem, labels, mmcv.bgr2rgb(image_bgr), palette,
                                                         args.opacity)
        present = [names[i] for i in np.unique(labels)]
        print_log(f"promptmatch: {path.name}: {', '.join(map(str, present))}", logger="current", level=logging.INFO)
        written.append(dict(image=str(path), mask=str(mask_path), overlay=str(overlay_path)))
    print(f"segmented {len(written)} image(s) with {args.checkpoint}; masks and overlays in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
