"""Command line of the benchmark: ``python -m promptmatch.benchmark`` (and ``tools/benchmark.py``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .cell import run_cell
from .report import write_report
from .runner import merge_results, run_benchmark
from .spec import SpecError, expand_grid, list_profiles, load_spec, profile_path, settings_label
from .store import BenchmarkLockedError

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of ``tools/benchmark.py`` (and ``python -m promptmatch.benchmark``)."""
    ap = argparse.ArgumentParser(prog="benchmark", description="Resumable benchmark grid of tuning methods; see "
                                 "configs/benchmark/README.md.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--profile", help="a profile shipped with promptmatch by name (quick, full, ...; "
                     "see --list-profiles)")
    src.add_argument("--spec", help="path of a spec file (.json, or .yaml with PyYAML)")
    ap.add_argument("--out", help="output directory (default work_dirs/bench_<spec name>)")
    ap.add_argument("--max-cells", type=int, default=None, help="run at most this many new cells, then stop")
    ap.add_argument("--retry-errors", action="store_true", help="run cells recorded as failed again")
    ap.add_argument("--report-only", action="store_true", help="only (re)write report.md and plots from results.jsonl")
    ap.add_argument("--merge", nargs="+", metavar="DIR", help="with --report-only: first add the results of these "
                    "output folders (e.g. the shards of one grid) to --out's results.jsonl")
    ap.add_argument("--shard", help="K/N: run only every N-th cell of the grid starting at K (0 <= K < N), so N "
                    "machines share a grid, each with its own --out; join them with --report-only --merge")
    ap.add_argument("--list", action="store_true", help="list the cells of the grid and exit")
    ap.add_argument("--validate", action="store_true", help="validate the spec and exit")
    ap.add_argument("--list-profiles", action="store_true", help="list the profiles shipped with promptmatch and exit")
    ap.add_argument("--launcher", choices=["none", "pytorch"], default=None,
                    help="pytorch: started by torchrun; mmengine cells train data-parallel over its processes "
                    "(default: pytorch when torchrun's WORLD_SIZE > 1)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--prior", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.cell:  # child process: one cell
        rec = run_cell(json.loads(Path(args.cell).read_text()), work_dir=args.work_dir,
                       prior=json.loads(Path(args.prior).read_text()) if args.prior else None)
        tmp = Path(args.record).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, allow_nan=True))
        tmp.replace(args.record)
        return 0

    if args.list_profiles:
        for name in list_profiles():
            print(f"{name:12s} {profile_path(name)}")
        return 0
    shard = None
    if args.shard is not None:
        try:
            k, n = (int(v) for v in args.shard.split("/"))
            if not 0 <= k < n:
                raise ValueError
        except ValueError:
            print(f"error: --shard takes K/N with 0 <= K < N (e.g. 0/4), got {args.shard!r}", file=sys.stderr)
            return 2
        shard = (k, n)
    if args.merge and not (args.report_only and args.out):
        print("error: --merge goes with --report-only and --out (the folder that receives the merged results)",
              file=sys.stderr)
        return 2
    if args.report_only and args.out and args.merge:
        try:
            added = merge_results(args.out, args.merge)
        except (FileNotFoundError, BenchmarkLockedError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"merged {added} record(s) from {len(args.merge)} folder(s) into {Path(args.out) / 'results.jsonl'}")
    if args.report_only and args.out and not (args.profile or args.spec):
        print(f"wrote {write_report(args.out)}")
        return 0
    try:
        spec = load_spec(args.spec if args.spec else profile_path(args.profile or "quick"))
        cells = expand_grid(spec)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"work_dirs/bench_{spec.name}")
    if args.validate or args.list:
        print(f"{spec.name}: valid; {len(cells)} cells ({len(spec.methods)} methods x {len(spec.backbones)} backbones "
              f"x {len(spec.datasets)} datasets x {len(spec.settings)} settings x {len(spec.seeds)} seeds"
              + (f"; {_n_excluded(spec, cells)} left out by 'exclude')" if spec.exclude else ")"))
        if args.validate:  # what a run checks before it trains anything: the data and every cell's settings
            from .validation import check_run

            check = check_run(spec, cells, deep=True, progress=not args.no_progress)
            for note in check.notes:
                print(f"note: {note}")
            if check.problems:
                print(f"error: {check.headline()}:" + "".join(
                    "\n  - " + p.replace("\n", "\n    ") for p in check.problems), file=sys.stderr)
                return 2
            print("data: every dataset is where the spec says and well-formed; settings: every cell's resolve "
                  "against the data, this machine and the installed packages")
        if args.list:
            for c in (cells if shard is None else cells[shard[0]::shard[1]]):
                print(f"  {c.method:12s} {c.backbone['name']:24s} {c.dataset['name']:16s} "
                      f"{settings_label(c.settings):40s} seed {c.seed}")
        return 0
    if args.report_only:
        print(f"wrote {write_report(out)}")
        return 0
    t0 = time.perf_counter()
    try:
        launcher = args.launcher or ("pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none")
        written = run_benchmark(spec, out, max_cells=args.max_cells, retry_errors=args.retry_errors,
                                progress=not args.no_progress, shard=shard, launcher=launcher)
    except (BenchmarkLockedError, SpecError) as e:  # SpecError: DataProblemsError, found before any training
        print(f"error: {e}", file=sys.stderr)
        return 2
    if launcher != "none":
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return 0  # rank 0 reports
    errors = sum(1 for r in written if r["status"] == "error")
    diverged = sum(1 for r in written if r["status"] == "diverged")
    print(f"{len(written)} cells run in {time.perf_counter() - t0:.0f} s ({errors} failed, {diverged} diverged); "
          f"results in {out / 'results.jsonl'}, report in {out / 'report.md'}")
    return 1 if errors else 0


def _n_excluded(spec, cells) -> int:
    """How many cells the spec's ``exclude`` rules leave out of its grid."""
    import dataclasses

    return len(expand_grid(dataclasses.replace(spec, exclude=[]))) - len(cells)


if __name__ == "__main__":
    sys.exit(main())
