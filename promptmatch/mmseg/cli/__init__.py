"""Command-line tools of the mmseg path; ``tools/*.py`` are thin wrappers around them.

- :mod:`.train`: train from an mmseg config, writing prompt checkpoints (``tools/train.py``);
- :mod:`.test`: evaluate a prompt checkpoint or a Runner ``.pth`` (``tools/test.py``);
- :mod:`.infer`: masks and overlays for images (``tools/infer.py``);
- :mod:`.extract_prompts`: a Runner ``.pth`` to a prompt checkpoint (``tools/extract_prompts.py``).

Each has ``main(argv=None) -> int`` and runs as ``python -m promptmatch.mmseg.cli.<name>``.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

__all__ = ["parse_with_launcher"]


def parse_with_launcher(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Add mmseg's distributed options (``--launcher``, ``--local_rank``) to ``parser``, parse
    ``argv`` and export ``LOCAL_RANK`` as mmseg's own tools do."""
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args
