#!/usr/bin/env python
"""Turn an mmengine Runner checkpoint of a prompted model into a prompt checkpoint.

A thin wrapper around :mod:`promptmatch.mmseg.cli.extract_prompts` (``python -m promptmatch.mmseg.cli.extract_prompts``
does the same from any directory); run with ``--help`` for its options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.mmseg.cli.extract_prompts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
