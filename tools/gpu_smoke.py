#!/usr/bin/env python
"""A 10-minute run of everything the library does on one GPU (shortened: on a CPU), as a table and JSON.

A thin wrapper around :mod:`promptmatch.tools.gpu_smoke`, where the code and its documentation live:

    python tools/gpu_smoke.py --out work_dirs/gpu_smoke.json             # on a GPU machine
    python tools/gpu_smoke.py --device cpu --quick --out work_dirs/smoke.json
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.gpu_smoke import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
