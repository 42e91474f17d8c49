#!/usr/bin/env python
"""The embedded default: SPM prompt tuning of a real pretrained, frozen backbone, offline.

A thin wrapper around :mod:`promptmatch.demo` (``python -m promptmatch.demo`` does the same
from any directory once the package is installed); see docs/demo.md.

    .venv/bin/python tools/demo.py [--dataset texture_mosaic] [--steps 400]
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
