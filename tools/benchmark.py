#!/usr/bin/env python
"""Benchmark grid of tuning methods x backbones x datasets x settings x seeds, resumable.

A thin wrapper around :mod:`promptmatch.benchmark` (``python -m promptmatch.benchmark`` does
the same from any directory once the package is installed).

    .venv/bin/python tools/benchmark.py --profile quick [--out work_dirs/bench_quick]
    .venv/bin/python tools/benchmark.py --spec my_grid.json --out work_dirs/mine
    .venv/bin/python tools/benchmark.py --out work_dirs/bench_quick --report-only

Each cell runs in its own child process and appends one JSON line to <out>/results.jsonl;
a restart skips finished cells. Writes <out>/report.md and PNG plots. See
configs/benchmark/README.md.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promptmatch.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
