#!/usr/bin/env python
"""Serving several datasets from one frozen backbone (PromptBank) versus one full model per dataset.

A thin wrapper around :mod:`promptmatch.tools.bank_serving`, where the code and its documentation live:

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bank_serving.py --backbone resnet50 --size 224 \\
        --requests 32 --datasets 1 4 16 --out work_dirs/bank_serving.json
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.bank_serving import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
