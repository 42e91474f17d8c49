#!/usr/bin/env python
"""Turn an mmengine Runner checkpoint of a prompted model into a prompt checkpoint.

A thin wrapper around :mod:`promptmatch.mmseg.cli.extract_prompts` (``python -m promptmatch.mmseg.cli.extract_prompts``
does the same from any directory); run with ``--help`` for its options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

USAGE = """\
usage: tools/extract_prompts.py CONFIG CHECKPOINT OUT [--cfg-options K=V ...] [-h | --help]

Extract the prompt checkpoint (.safetensors) from an mmengine Runner checkpoint (.pth) of a
prompted model trained from an mmseg config (needs the mmseg stack). Runs of the folder engine
(tools/train.py --folder) write their prompt checkpoint themselves.
"""

from promptmatch.tools._common import run_mmseg_tool  # noqa: E402


def main() -> int:
    return run_mmseg_tool("promptmatch.mmseg.cli.extract_prompts", USAGE)

if __name__ == "__main__":
    sys.exit(main())
