#!/usr/bin/env python
"""Train a segmentor from an mmseg config (promptmatch models: with prompt checkpoints).

A thin wrapper around :mod:`promptmatch.mmseg.cli.train` (``python -m promptmatch.mmseg.cli.train``
does the same from any directory); run with ``--help`` for its options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.mmseg.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
