#!/usr/bin/env python
"""Segment images with a prompt checkpoint: a colour-coded mask and an overlay per image.

A thin wrapper around :mod:`promptmatch.mmseg.cli.infer` (``python -m promptmatch.mmseg.cli.infer``
does the same from any directory); run with ``--help`` for its options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.mmseg.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
