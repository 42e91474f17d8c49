"""Train a per-dataset prompt checkpoint on an image/mask folder with one command (no mmcv, no mmseg).

    python -m promptmatch.train --folder DIR --backbone NAME [--weights W] --method spm --out DIR
    torchrun --nproc_per_node 2 -m promptmatch.train --folder DIR ...   # data-parallel

``DIR`` is a folder dataset (``img_dir/<split>/`` and ``ann_dir/<split>/`` with a
``classes.json`` or ``classes.txt``; see ``configs/benchmark/README.md``). Training runs through
mmengine's Runner (:mod:`promptmatch.engine`) with mmseg's recipe (AdamW, poly schedule, random
resize / crop / flip / photometric distortion) and validates on the ``val`` split (or a held-out
part of ``train``, ``--holdout``). ``--out`` receives ``prompts.safetensors`` (the prompt
checkpoint), ``segmentor.safetensors`` (backbone and prompts in one file, for
``promptmatch.predict_cli``), ``metrics.json`` (the val mIoU), ``train_config.json``, mmengine's
logs and ``iter_<n>.pth`` checkpoints (``--resume`` continues from the last one).
``python -m promptmatch.test --folder DIR --prompts OUT/prompts.safetensors`` evaluates it again.

Backbones are timm model names, randomly initialised unless ``--weights FILE`` (a local file)
or ``--pretrained`` (timm's download; off under ``HF_HUB_OFFLINE=1``) says otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "parse_args", "config_from_args"]

_logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


def _json_arg(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); give an object such as '{{\"depth\": 4}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"depth\": 4}}', got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments (every option but ``--folder``, ``--backbone`` and ``--out`` has a default)."""
    p = argparse.ArgumentParser(prog="python -m promptmatch.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--folder", required=True, help="the dataset root holding img_dir/ and ann_dir/")
    g.add_argument("--classes", default=None,
                   help="class names, comma-separated (default: the folder's classes.json / classes.txt)")
    g.add_argument("--train-split", default="train", help="the training split folder")
    g.add_argument("--val-split", default="val", help="the validation split folder")
    g.add_argument("--holdout", type=float, default=None,
                   help="validate on this fraction of the training split instead of --val-split (e.g. 0.2)")
    g.add_argument("--reduce-zero-label", action="store_true", help="mask value 0 is 'ignore', v is class v-1")
    g.add_argument("--img-suffix", default=None, help="image file ending (default: .png/.jpg/.jpeg)")
    g.add_argument("--seg-map-suffix", default=".png", help="mask file ending")
    g.add_argument("--no-check", action="store_true", help="skip checking every file before training")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", required=True, help="a timm model name (e.g. vit_base_patch16_224, test_resnet)")
    g.add_argument("--weights", default=None, help="a local weights file of the backbone (default: random init)")
    g.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the network)")
    g.add_argument("--weights-remap", action="store_true", help="remap the weights' keys to timm's names")
    g.add_argument("--backbone-kwargs", type=_json_arg, default=None, help="timm.create_model keyword arguments (JSON)")
    g.add_argument("--num-stages", type=int, default=None, help="block groups of a plain ViT (default 4)")
    g.add_argument("--method", default="spm", help="the tuning method (promptmatch.list_methods())")
    g.add_argument("--method-cfg", type=_json_arg, default=None, help="the method's config fields (JSON)")
    g.add_argument("--decoder", default="linear", help="the decode head (promptmatch.list_decoders())")
    g.add_argument("--decoder-cfg", type=_json_arg, default=None, help="the decoder's config fields (JSON)")
    g = p.add_argument_group("schedule (mmseg's recipe)")
    g.add_argument("--steps", type=int, default=2000, help="training iterations")
    g.add_argument("--batch", type=int, default=8, help="crops per iteration and process")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (poly decay to zero)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--crop", type=int, default=512, help="training crop side (images resized by 0.5-2.0 first)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision (bf16: CPU or CUDA; fp16: CUDA, with loss scaling)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to train (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="random seed (initialisation, sampling, augmentation)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--max-bad-steps", type=int, default=0, help="non-finite steps to skip before stopping")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-mode", choices=["whole", "slide"], default="whole", help="whole-image or sliding windows")
    g.add_argument("--eval-crop", type=int, default=None, help="sliding-window side (default: --crop)")
    g.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride (default: 2/3 of the window)")
    g.add_argument("--no-eval-resize", action="store_true",
                   help="evaluate at the original size instead of resizing to the recipe's test scale")
    g = p.add_argument_group("output and running")
    g.add_argument("--out", required=True, help="the output folder (checkpoints, logs, prompts, metrics)")
    g.add_argument("--checkpoint-interval", type=int, default=None,
                   help="save a resumable checkpoint every N iterations (default: min(steps, 1000))")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--no-merged", action="store_true", help="do not write segmentor.safetensors")
    g.add_argument("--launcher", choices=["auto", "none", "pytorch"], default="auto",
                   help="'pytorch' under torchrun (auto: when WORLD_SIZE > 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


def _input_problems(args: argparse.Namespace) -> List[str]:
    """Bad names and paths, each with its fix, found before anything is built."""
    from pathlib import Path

    import timm

    from .decoders import list_decoders
    from .methods import list_methods

    problems = []
    if not Path(args.folder).expanduser().is_dir():
        problems.append(f"--folder {args.folder}: no such folder; give the dataset root that holds "
                        "img_dir/<split>/ and ann_dir/<split>/ (see configs/benchmark/README.md)")
    elif args.holdout is None and not (Path(args.folder).expanduser() / "img_dir" / args.val_split).is_dir():
        problems.append(f"--folder {args.folder} has no validation split img_dir/{args.val_split}/: validate on a "
                        "held-out part of the training split with --holdout 0.2, or name the split with --val-split")
    if not timm.is_model(args.backbone):
        close = timm.list_models(f"*{args.backbone.split('_')[0]}*")[:8] if args.backbone else []
        examples = close or ["test_resnet", "vit_base_patch16_224"]
        problems.append(f"--backbone {args.backbone!r} is not a timm model name; e.g. {examples} "
                        "(python -c \"import timm; print(timm.list_models('*vit*'))\" lists them)")
    if args.method not in list_methods():
        problems.append(f"--method {args.method!r} is unknown; choose one of {list(list_methods())}")
    if args.decoder not in list_decoders():
        problems.append(f"--decoder {args.decoder!r} is unknown; choose one of {list(list_decoders())}")
    if args.weights is not None and not Path(args.weights).expanduser().is_file():
        problems.append(f"--weights {args.weights}: no such file; give a local weights file of the backbone, "
                        "or leave --weights out to start from a random init")
    if args.weights is not None and args.pretrained:
        problems.append("--weights and --pretrained exclude each other: give one")
    if args.holdout is not None and not 0 < args.holdout < 1:
        problems.append(f"--holdout must be a fraction between 0 and 1 (e.g. 0.2), got {args.holdout}")
    return problems


def config_from_args(args: argparse.Namespace):
    """The :class:`~promptmatch.engine.FolderTrainConfig` the arguments describe."""
    from .engine import FolderTrainConfig

    cfg = FolderTrainConfig(
        folder=args.folder, backbone=args.backbone, out=args.out, method=args.method, decoder=args.decoder,
        weights=args.weights, pretrained=args.pretrained, weights_remap=args.weights_remap,
        method_cfg=args.method_cfg, decoder_cfg=args.decoder_cfg, backbone_kwargs=args.backbone_kwargs,
        num_stages=args.num_stages,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        reduce_zero_label=args.reduce_zero_label, img_suffix=args.img_suffix, seg_map_suffix=args.seg_map_suffix,
        train_split=args.train_split, val_split=args.val_split, steps=args.steps, batch=args.batch, lr=args.lr,
        weight_decay=args.weight_decay, crop=args.crop, amp=None if args.amp == "none" else args.amp,
        device=args.device, seed=args.seed, workers=args.workers, max_bad_steps=args.max_bad_steps,
        eval_mode=args.eval_mode,
        eval_crop=args.eval_crop, eval_stride=args.eval_stride, eval_resize=not args.no_eval_resize,
        checkpoint_interval=args.checkpoint_interval, resume=args.resume, save_merged=not args.no_merged,
        launcher=args.launcher, progress=not args.no_progress, check_data=not args.no_check,
        log_level="WARNING" if args.quiet else "INFO")
    if args.holdout is not None:
        from .datasets.folder import folder_pairs
        from .engine.runner import describe
        from .training import holdout_split

        n = len(folder_pairs(describe(cfg), cfg.train_split))
        cfg.train_indices, cfg.val_indices = holdout_split(n, args.holdout, seed=0)
        cfg.val_split = cfg.train_split
        cfg.extra["val_indices"] = cfg.val_indices
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0 done, 1 training failed, 2 bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    problems = _input_problems(args)
    if problems:
        print("promptmatch.train: nothing was trained:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return EXIT_BAD_INPUT
    from .datasets.folder import FolderDatasetError
    from .divergence import DivergenceError
    from .engine import train_folder
    from .engine.compat import close_process_group
    from .engine.runner import _is_main

    try:
        cfg = config_from_args(args)
        result = train_folder(cfg)
    except (FolderDatasetError, ValueError, FileNotFoundError) as e:
        print(f"promptmatch.train: nothing was trained: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DivergenceError as e:  # every process stops at the same step (the guard agrees across them)
        print(f"promptmatch.train: {e}", file=sys.stderr)
        close_process_group()
        return 1
    main_process = _is_main()
    close_process_group()
    if main_process:
        miou = result.get("val_miou")
        print(f"val mIoU ({cfg.val_split}{' held-out part' if args.holdout else ''}): "
              f"{'n/a' if miou is None else f'{100 * miou:.2f} %'}")
        for key in ("prompts", "merged", "metrics_file"):
            if key in result:
                print(f"{key}: {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
