#!/usr/bin/env python
"""Measure SPM's parameter budget and prompt-checkpoint size against the backbone.

A thin wrapper around :mod:`promptmatch.tools.param_report`, where the code and its documentation live:

    python tools/param_report.py --out docs/figures/param_report
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.param_report import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
