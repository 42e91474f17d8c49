#!/usr/bin/env python
"""Segment images: per image a class-index PNG, a colour-coded mask and an overlay.

    python tools/infer.py CONFIG PROMPTS [--images PATH] [...]     # an mmseg config + prompt checkpoint
    python tools/infer.py --segmentor FILE --images PATH [...]     # a merged segmentor file, no mmseg

A thin wrapper around :func:`promptmatch.predict_cli.infer_main`, which hands the first form to
:mod:`promptmatch.mmseg.cli.infer` and the second to :mod:`promptmatch.predict_cli` (``python -m
...`` does the same from any directory); run with ``--help`` for the options (no mmseg needed).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.predict_cli import infer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(infer_main())
