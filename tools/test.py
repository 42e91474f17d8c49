#!/usr/bin/env python
"""Evaluate a prompt checkpoint (or a Runner .pth of a prompted model) on a config's test set,
or on a folder of images and masks with ``--folder DIR`` (no mmseg stack needed).

A thin wrapper around :mod:`promptmatch.mmseg.cli.test` (``python -m promptmatch.mmseg.cli.test``
does the same from any directory) and, with ``--folder``, :mod:`promptmatch.test`
(``python -m promptmatch.test``); run with ``--help`` (or ``--folder DIR --help``) for the options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

USAGE = """\
usage: tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options K=V ...]
                     [--launcher {none,pytorch,slurm,mpi}] [-h | --help]
       tools/test.py --folder DIR --prompts FILE [...]

Evaluate a prompt checkpoint on an mmseg config's test set (needs the mmseg stack), or on a
folder of images and masks with --folder (no mmseg: `tools/test.py --folder DIR --help` lists
its options).
"""

if any(a == "--folder" or a.startswith("--folder=") for a in sys.argv[1:]):
    # a folder of images and masks: promptmatch's own engine (mmengine's Runner, no mmcv)
    from promptmatch.test import main  # noqa: E402
else:
    from promptmatch.tools._common import run_mmseg_tool  # noqa: E402

    def main() -> int:
        return run_mmseg_tool("promptmatch.mmseg.cli.test", USAGE)

if __name__ == "__main__":
    sys.exit(main())
