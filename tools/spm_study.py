#!/usr/bin/env python
"""Why SPM helps or does not: train SPM variants on offline datasets and look inside.

A thin wrapper around :mod:`promptmatch.tools.spm_study`, where the code and its documentation live:

    python tools/spm_study.py --datasets texture_mosaic photo_collage --decoders multilevel \\
        --variants spm 'spm-taps:{"decoder_taps": "before_prompt"}' --seeds 0 --out study.json
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from promptmatch.tools.spm_study import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
