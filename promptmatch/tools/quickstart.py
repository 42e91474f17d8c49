"""Quickstart: prompt-tune a frozen backbone on a small synthetic task, save, reload, check.

Runs offline on the CPU in well under a minute:

    .venv/bin/python tools/quickstart.py --backbone resnet18 --steps 60

The task: images made of four coloured quadrants plus noise, each quadrant's colour
determining its class. The backbone is randomly initialised here (no weights are
downloaded); pass ``--weights /path/to/file.safetensors`` to use real pretrained ones.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

import torch
from tqdm import tqdm

import promptmatch as pm

__all__ = ["main", "make_batch"]


def make_batch(n: int, side: int, num_classes: int, generator: torch.Generator):
    """``n`` images of four coloured quadrants plus noise, and their (n, side, side) labels."""
    labels = torch.randint(0, num_classes, (n, 2, 2), generator=generator)
    labels = labels.repeat_interleave(side // 2, 1).repeat_interleave(side // 2, 2)
    palette = torch.linspace(-1, 1, num_classes)[:, None].repeat(1, 3) * torch.tensor([1.0, -0.5, 0.25])
    images = palette[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(n, 3, side, side, generator=generator)
    return images.contiguous(), labels


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train, save, reload and check; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--weights", default=None, help="local .safetensors/.pth pretrained weights")
    ap.add_argument("--decoder", default="linear", choices=pm.list_decoders())
    ap.add_argument("--num-classes", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="work_dirs/quickstart/prompts.safetensors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    model = pm.create_segmentor(args.backbone, "spm", args.num_classes, args.decoder, weights=args.weights)
    print(model.staged)
    print(pm.parameter_report(model))

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
    model.train()
    bar = tqdm(range(args.steps), desc="training SPM", unit="step")
    for _ in bar:
        images, labels = make_batch(8, args.size, args.num_classes, gen)
        losses = model.loss(images, labels)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    images, labels = make_batch(16, args.size, args.num_classes, torch.Generator().manual_seed(123))
    with torch.no_grad():
        pred = model.predict(images)
    acc = (pred == labels).float().mean().item()
    print(f"held-out pixel accuracy: {acc:.3f} (chance {1 / args.num_classes:.3f})")

    path = pm.save_prompts(model, args.out)
    print(f"prompt checkpoint: {path} ({path.stat().st_size / 1024:.1f} KiB)")
    pm.load_prompts(model, path)
    with torch.no_grad():
        assert torch.equal(model.predict(images), pred)
    print("reloaded prompts reproduce the predictions exactly")
    return 0
