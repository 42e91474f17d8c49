"""``python -m promptmatch.benchmark``: see :mod:`promptmatch.benchmark.cli`."""
import sys

from .cli import main

sys.exit(main())
