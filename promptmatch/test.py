"""Evaluate a prompt checkpoint (or a merged segmentor file) on an image/mask folder (no mmcv, no mmseg).

    python -m promptmatch.test --folder DIR --prompts OUT/prompts.safetensors [--split val] [--out M.json]
    python -m promptmatch.test --folder DIR --segmentor OUT/segmentor.safetensors

A prompt checkpoint written by ``python -m promptmatch.train`` records its backbone (name,
weights file, seed of a random init), classes and evaluation settings, so nothing else is
needed and the mIoU printed is the training run's val mIoU again; ``--backbone``/``--weights``
name the backbone of a checkpoint written elsewhere, or a moved weights file. The evaluation
is the training run's validation (same test-time resize, whole or sliding-window inference,
autocast); ``--eval-mode`` and friends override it. Prints mIoU, aAcc and every class's IoU;
``--out`` writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "parse_args", "load_for_test"]

_logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m promptmatch.test", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, help="the dataset root holding img_dir/ and ann_dir/")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="a prompt checkpoint (prompts.safetensors of promptmatch.train)")
    src.add_argument("--segmentor", help="a merged segmentor file (segmentor.safetensors)")
    p.add_argument("--backbone", default=None, help="the timm backbone name (default: the checkpoint's record)")
    p.add_argument("--weights", default=None, help="the backbone's weights file (default: the checkpoint's record)")
    p.add_argument("--split", default=None, help="the split to evaluate (default: the training run's val split)")
    p.add_argument("--all", action="store_true",
                   help="every sample of the split (default: the training run's held-out part where it had one)")
    p.add_argument("--eval-mode", choices=["whole", "slide"], default=None, help="default: the training run's")
    p.add_argument("--eval-crop", type=int, default=None, help="sliding-window side (default: the training run's)")
    p.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride (default: the training run's)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None, help="default: the training run's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out", default=None, help="write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def load_for_test(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """The segmentor to evaluate and the training run's record (``extra`` of its file, ``{}`` if none).

    Raises ``ValueError``/``FileNotFoundError`` naming what is missing and how to give it.
    """
    from .checkpoint import load_prompts, read_prompt_metadata
    from .merged import load_segmentor, read_segmentor_metadata

    if args.segmentor is not None:
        if not Path(args.segmentor).is_file():
            raise FileNotFoundError(f"--segmentor {args.segmentor}: no such file")
        extra = dict(read_segmentor_metadata(args.segmentor).get("extra") or {})
        return load_segmentor(args.segmentor), extra
    if not Path(args.prompts).is_file():
        raise FileNotFoundError(f"--prompts {args.prompts}: no such file; give the prompts.safetensors that "
                                "python -m promptmatch.train wrote into its --out folder")
    meta = read_prompt_metadata(args.prompts)
    extra = dict(meta.get("extra") or {})
    backbone = args.backbone or extra.get("backbone")
    if not backbone:
        raise ValueError(f"{args.prompts} does not record its backbone's timm name (it was not written by "
                         f"promptmatch.train): give --backbone NAME (its architecture is "
                         f"{meta.get('backbone', {}).get('architecture')!r}) and --weights FILE")
    weights = args.weights or extra.get("weights")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"the backbone weights {weights} (recorded in {args.prompts}) do not exist: give "
                                "--weights FILE with the same weights the prompts were trained on")
    from .engine import build_segmentor

    model = build_segmentor(backbone, meta["method"], int(meta["num_classes"]), decoder=meta["decoder"],
                            class_names=meta.get("class_names"), weights=weights,
                            pretrained=bool(extra.get("pretrained")) and weights is None,
                            weights_remap=bool(extra.get("weights_remap")), method_cfg=meta.get("method_config"),
                            decoder_cfg=meta.get("decoder_config"), backbone_kwargs=extra.get("backbone_kwargs"),
                            num_stages=extra.get("num_stages"), seed=int(extra.get("seed", 0)))
    load_prompts(model, args.prompts)
    return model, extra


def _settings(args: argparse.Namespace, extra: Dict[str, Any]) -> Dict[str, Any]:
    crop = args.eval_crop or (extra.get("eval_crop") or [None])[0]
    stride = args.eval_stride or (extra.get("eval_stride") or [None])[0]
    amp = extra.get("amp") if args.amp is None else (None if args.amp == "none" else args.amp)
    return {"eval_mode": args.eval_mode or extra.get("eval_mode", "whole"),
            "eval_crop": (crop, crop) if crop else None, "eval_stride": (stride, stride) if stride else None,
            "eval_scale": extra.get("eval_scale"), "amp": amp}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0 done, 2 bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch

    from .checkpoint import PromptMismatchError
    from .datasets.folder import FolderDatasetError, describe_folder_dataset
    from .engine import evaluate_folder

    try:
        model, extra = load_for_test(args)
        split = args.split or extra.get("val_split", "val")
        names = list(getattr(model, "class_names", None) or [])
        root = Path(args.folder).expanduser()
        has_file = (root / "classes.json").is_file() or (root / "classes.txt").is_file()
        folder = describe_folder_dataset(root, classes=None if has_file or not names else names, splits=(split,),
                                         reduce_zero_label=bool(extra.get("reduce_zero_label", False)))
        if names and names != list(folder.classes):
            raise ValueError(f"the folder's classes {list(folder.classes)} differ from the checkpoint's {names}; "
                             "evaluate on a folder with the classes the prompts were trained on")
        indices: Optional[List[int]] = None
        if not args.all and args.split is None and extra.get("val_indices") is not None:
            indices = list(extra["val_indices"])  # the training run validated on a held-out part
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        metrics = evaluate_folder(model, folder, split, indices=indices, device=device, workers=args.workers,
                                  progress=not args.no_progress, **_settings(args, extra))
    except (FolderDatasetError, PromptMismatchError, ValueError, FileNotFoundError) as e:
        print(f"promptmatch.test: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"mIoU ({split}{', held-out part' if indices is not None else ''}): {100 * metrics['mIoU']:.2f} %  "
          f"aAcc: {100 * metrics['aAcc']:.2f} %  mAcc: {100 * metrics['mAcc']:.2f} %")
    for key, value in metrics.items():
        if key.startswith("IoU."):
            print(f"  {key[4:]}: {100 * value:.2f} %")
    if extra.get("val_miou") is not None:
        print(f"training run's val mIoU: {100 * extra['val_miou']:.2f} %")
    if args.out:
        record = {"split": split, "held_out": indices is not None, "metrics": metrics, "val_miou": metrics["mIoU"],
                  "checkpoint": args.prompts or args.segmentor}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
