#!/usr/bin/env python
"""Export a prompted segmentor to ONNX, checked with onnxruntime.

A thin wrapper around :mod:`promptmatch.export_cli` (``python -m promptmatch.export_cli``
does the same from any directory):

    python tools/export.py --segmentor segmentor.safetensors --out model.onnx --size 512 512
    python tools/export.py --prompts prompts.safetensors --weights backbone.safetensors --out model.onnx --size 512 512
    python tools/export.py --config CONFIG --prompts PROMPTS --out model.onnx --size 512 512 [--dynamic] [--latency 20]

See docs/deploy.md.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.export_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
