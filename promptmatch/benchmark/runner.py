"""The grid: every unfinished cell of a spec, one after the other, into one output folder."""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .cell import error_record, run_cell, run_cell_in_child
from .report import write_report
from .spec import BenchmarkSpec, expand_grid, settings_label
from .store import OutputLock, ResultStore

__all__ = ["run_benchmark"]

_logger = logging.getLogger(__name__)


def run_benchmark(spec: BenchmarkSpec, out: Union[str, os.PathLike], max_cells: Optional[int] = None,
                  retry_errors: bool = False, progress: bool = True, report: bool = True,
                  isolate: bool = True) -> List[Dict[str, Any]]:
    """Run every unfinished cell of ``spec`` (each in a child process), appending to ``<out>/results.jsonl``.

    Args:
        max_cells: stop after running this many new cells (the rest stay for a later run).
        retry_errors: run again the cells recorded with ``status: "error"``.
        report: write ``report.md`` and the plots at the end.
        isolate: run each cell in a child process (default). ``False`` runs cells in this
            process (fast, for tests); their CPU peak memory is then not per cell.

    Returns:
        The records written by this call.

    Raises:
        BenchmarkLockedError: another run is writing to ``out`` (see :class:`OutputLock`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        return _run_benchmark_locked(spec, out, max_cells, retry_errors, progress, report, isolate)


def _run_benchmark_locked(spec: BenchmarkSpec, out: Path, max_cells: Optional[int], retry_errors: bool,
                          progress: bool, report: bool, isolate: bool) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    (out / "spec.json").write_text(json.dumps(spec.raw, indent=2) + "\n")
    store = ResultStore(out / "results.jsonl")
    cells = expand_grid(spec)
    done = store.done_keys(retry_errors)
    todo = [c for c in cells if c.key not in done]
    _logger.info("%s: %d cells, %d finished before, %d to run", spec.name, len(cells), len(cells) - len(todo), len(todo))
    if max_cells is not None:
        todo = todo[:max_cells]
    from promptmatch import datasets as pmdata

    for d in spec.datasets:  # build once here, not concurrently in children
        if d.get("source", "offline") == "offline":
            pmdata.build_offline_dataset(d["name"])
    written = []
    bar = tqdm(total=len(todo), desc=f"benchmark {spec.name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in todo:
        bar.set_postfix_str(f"{cell.method} | {cell.backbone['name']} | {cell.dataset['name']} | "
                            f"{settings_label(cell.settings)} | seed {cell.seed}", refresh=True)
        if isolate:
            rec = run_cell_in_child(cell, spec.cell_timeout_s)
        else:
            try:
                rec = run_cell(cell)
            except Exception:  # same record as a failed child: the traceback is the reason
                rec = error_record(cell, traceback.format_exc()[-4000:], 0.0)
            if "peak_mem_kind" in rec and rec["peak_mem_kind"].startswith("cpu"):
                rec["peak_mem_kind"] += " (in-process, not isolated)"
        rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        store.append(rec)
        written.append(rec)
        if rec["status"] == "error":
            _logger.warning("cell failed: %s: %s", cell.key, rec.get("reason", "")[-500:])
        elif rec["status"] == "diverged":
            _logger.warning("cell diverged (recorded, not ranked): %s at step %s, lr %s", cell.method,
                            rec.get("diverged_at_step"), rec.get("diverged_lr"))
        bar.update(1)
    bar.close()
    if report:
        write_report(out)
    return written

