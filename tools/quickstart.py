#!/usr/bin/env python
"""Quickstart: prompt-tune a frozen backbone on a small synthetic task, save, reload, check.

A thin wrapper around :mod:`promptmatch.tools.quickstart`, where the code and its documentation live:

    .venv/bin/python tools/quickstart.py --backbone resnet18 --steps 60
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.quickstart import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
