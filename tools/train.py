#!/usr/bin/env python
"""Train a segmentor from an mmseg config (promptmatch models: with prompt checkpoints), or
prompt-tune on a folder of images and masks with ``--folder DIR`` (no mmseg stack needed).

A thin wrapper around :mod:`promptmatch.mmseg.cli.train` (``python -m promptmatch.mmseg.cli.train``
does the same from any directory) and, with ``--folder``, :mod:`promptmatch.train`
(``python -m promptmatch.train``); run with ``--help`` (or ``--folder DIR --help``) for the options.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

USAGE = """\
usage: tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp] [--cfg-options K=V ...]
                      [--launcher {none,pytorch,slurm,mpi}] [-h | --help]
       tools/train.py --folder DIR --backbone NAME [--method spm] --out DIR [...]

Train a (prompt-tuned) segmentor from an mmseg config (needs the mmseg stack), or prompt-tune
on a folder of images and masks with --folder (no mmseg: `tools/train.py --folder DIR --help`
lists its options).
"""

if any(a == "--folder" or a.startswith("--folder=") for a in sys.argv[1:]):
    # a folder of images and masks: promptmatch's own engine (mmengine's Runner, no mmcv)
    from promptmatch.train import main  # noqa: E402
else:
    from promptmatch.tools._common import run_mmseg_tool  # noqa: E402

    def main() -> int:
        return run_mmseg_tool("promptmatch.mmseg.cli.train", USAGE)

if __name__ == "__main__":
    sys.exit(main())
