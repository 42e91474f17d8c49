"""Measure SPM's parameter budget and prompt-checkpoint size against the backbone.

For each backbone (randomly initialised: counts and sizes do not depend on the weights),
build ``create_segmentor(name, method, num_classes=K, decoder)``, count parameters by
component, write a prompt checkpoint and a full-model checkpoint (both safetensors) and
compare their sizes. Prints a markdown table and writes it (plus JSON) to ``--out``.

    python tools/param_report.py --out docs/figures/param_report
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

import promptmatch as pm

__all__ = ["main", "measure", "to_markdown", "DEFAULT_BACKBONES"]

DEFAULT_BACKBONES = ["vit_base_patch16_224", "resnet50"]


def measure(name: str, num_classes: int, decoder: str, method: str) -> dict:
    """Parameter counts and checkpoint sizes of one randomly initialised segmentor."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = pm.create_segmentor(name, method, num_classes, decoder)
    rep = pm.parameter_report(model)
    backbone = rep.backbone_total
    method_params = rep.components["method"]["trainable"]
    head_params = rep.components["decode_head"]["trainable"]
    with tempfile.TemporaryDirectory() as tmp:
        prompt_path = pm.save_prompts(model, Path(tmp) / "prompts.safetensors")
        full_path = Path(tmp) / "full.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(full_path))
        prompt_bytes = prompt_path.stat().st_size
        full_bytes = full_path.stat().st_size
    return {
        "backbone": name,
        "method": method,
        "decoder": decoder,
        "num_classes": num_classes,
        "stages": [s.module for s in model.staged.stages],
        "backbone_params": backbone,
        "method_params": method_params,
        "decode_head_params": head_params,
        "trainable_params": rep.trainable,
        "method_pct_of_backbone": 100.0 * method_params / backbone,
        "trainable_pct_of_backbone": 100.0 * rep.trainable / backbone,
        "prompt_checkpoint_bytes": prompt_bytes,
        "full_checkpoint_bytes": full_bytes,
        "prompt_over_full": prompt_bytes / full_bytes,
    }


def to_markdown(rows: list) -> str:
    """The rows of :func:`measure` as a markdown table."""
    lines = [
        "| backbone | decoder | K | backbone params | SPM params (% backbone) | trainable (% backbone) "
        "| prompt ckpt | full ckpt | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['decoder']} | {r['num_classes']} | {r['backbone_params'] / 1e6:.2f}M "
            f"| {r['method_params'] / 1e6:.3f}M ({r['method_pct_of_backbone']:.2f}%) "
            f"| {r['trainable_params'] / 1e6:.3f}M ({r['trainable_pct_of_backbone']:.2f}%) "
            f"| {r['prompt_checkpoint_bytes'] / 2**20:.2f} MiB | {r['full_checkpoint_bytes'] / 2**20:.1f} MiB "
            f"| 1/{1 / r['prompt_over_full']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure every backbone and decoder, print and write the table; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--decoders", nargs="+", default=["linear", "multilevel"])
    ap.add_argument("--method", default="spm")
    ap.add_argument("--out", default="work_dirs/param_report", help="output prefix (.md and .json are added)")
    args = ap.parse_args(argv)
    rows = [measure(b, args.num_classes, d, args.method) for b in args.backbones for d in args.decoders]
    md = to_markdown(rows)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0
