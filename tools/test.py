#!/usr/bin/env python
"""Evaluate a prompt checkpoint (or a Runner .pth of a prompted model) on a config's test set.

A thin wrapper around :mod:`promptmatch.mmseg.cli.test` (``python -m promptmatch.mmseg.cli.test``
does the same from any directory); run with ``--help`` for its options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.mmseg.cli.test import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
