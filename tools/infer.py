#!/usr/bin/env python
"""Segment images: a colour-coded mask and an overlay per image.

    python tools/infer.py CONFIG PROMPTS [--images PATH] [...]     # an mmseg config + prompt checkpoint
    python tools/infer.py --segmentor FILE --images PATH [...]     # a merged segmentor file, no mmseg

Thin wrappers around :mod:`promptmatch.mmseg.cli.infer` and :mod:`promptmatch.predict_cli`
(``python -m ...`` does the same from any directory); run with ``--help`` for the options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __name__ == "__main__":
    if any(a == "--segmentor" or a.startswith("--segmentor=") for a in sys.argv[1:]):
        from promptmatch.predict_cli import main
    else:
        from promptmatch.mmseg.cli.infer import main
    sys.exit(main())
