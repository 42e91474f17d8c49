#!/usr/bin/env python
"""Side-by-side cost of tuning methods: inference, training step, peak memory, trainable params.

A thin wrapper around :mod:`promptmatch.tools.cost`, where the code and its documentation live:

    .venv/bin/python tools/cost.py --backbone resnet50 --size 256 --batch 2 --decoder linear \\
        --variant spm --variant 'late=spm:{"prompt_boundaries": [-2, -1], "backprop_backbone": true}' --out work_dirs/cost.json
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.cost import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
