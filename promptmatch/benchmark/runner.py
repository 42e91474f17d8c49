"""The grid: every unfinished cell of a spec, one after the other, into one output folder."""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .cell import error_record, run_cell, run_cell_in_child, sweep_pending
from .report import reason_summary, tail_lines, write_report
from .spec import BenchmarkSpec, Cell, expand_grid, settings_label
from .store import OutputLock, ResultStore, is_finished

__all__ = ["run_benchmark", "merge_results", "cell_dir"]

_logger = logging.getLogger(__name__)

#: engines whose cells train data-parallel over every process of a ``torchrun`` group
_DATA_PARALLEL_ENGINES = ("runner", "mmengine")


def run_benchmark(spec: BenchmarkSpec, out: Union[str, os.PathLike], max_cells: Optional[int] = None,
                  retry_errors: bool = False, progress: bool = True, report: bool = True,
                  isolate: bool = True, shard: Optional[Tuple[int, int]] = None,
                  launcher: str = "none") -> List[Dict[str, Any]]:
    """Run every unfinished cell of ``spec`` (each in a child process), appending to ``<out>/results.jsonl``.

    Args:
        max_cells: stop after running this many new cells (the rest stay for a later run).
        retry_errors: run again the cells recorded with ``status: "error"``.
        report: write ``report.md`` and the plots at the end.
        isolate: run each cell in a child process (default). ``False`` runs cells in this
            process (fast, for tests); their CPU peak memory is then not per cell.
        shard: ``(k, n)``: only the cells at positions k, k + n, k + 2n, ... of the grid
            (:func:`expand_grid`'s order), so n machines or GPUs share a grid, each with its
            own ``out``; :func:`merge_results` joins their folders.
        launcher: ``"pytorch"`` when started by ``torchrun`` (several processes): every
            process runs the grid in-process and the mmengine cells train with mmengine's
            distributed data parallel over all of them (``batch`` is per process); in-memory
            cells run on rank 0 alone. Rank 0 holds the lock and writes the records and the
            report.

    Everything a run will meet is checked first (the spec, :func:`~.validation.check_run`'s
    data and settings checks, the lock): a refused run leaves ``out`` as it was.

    Returns:
        The records written by this call.

    Raises:
        SpecError: the grid cannot be built from the spec.
        DataProblemsError: bad data, or settings that do not resolve against the data, this
            machine or the installed packages; every problem is listed, nothing was trained.
        BenchmarkLockedError: another run is writing to ``out`` (see :class:`OutputLock`).
    """
    if shard is not None:
        k, n = shard
        if not (isinstance(k, int) and isinstance(n, int) and n >= 1 and 0 <= k < n):
            raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    out = Path(out)
    rank = _init_distributed(spec.device) if launcher != "none" else 0
    cells = expand_grid(spec)  # a bad spec is refused here, before anything is written
    if shard is not None:
        cells = cells[shard[0]::shard[1]]
    if rank == 0:
        OutputLock.check_free(out)  # refused while another run holds it: nothing written either
    _check_before_training(spec, out, cells, max_cells, retry_errors, progress and rank == 0)
    out.mkdir(parents=True, exist_ok=True)  # validated first, written after
    if launcher != "none":
        import contextlib

        with OutputLock(out) if rank == 0 else contextlib.nullcontext():
            return _run_benchmark_locked(spec, out, cells, max_cells, retry_errors, progress and rank == 0,
                                         report and rank == 0, False, launcher, rank)
    with OutputLock(out):
        return _run_benchmark_locked(spec, out, cells, max_cells, retry_errors, progress, report, isolate)


def _check_before_training(spec: BenchmarkSpec, out: Path, cells: List[Cell], max_cells: Optional[int],
                           retry_errors: bool, progress: bool) -> None:
    """Refuse (raise :class:`DataProblemsError`) a run that would meet bad data or settings that
    do not resolve against the data, this machine or the installed packages; log the notes.
    Reads ``out``'s results (to check only the cells still to run), writes nothing."""
    from .data import DataProblemsError, entry_source
    from .validation import check_run

    todo = _todo(out, cells, retry_errors, max_cells)
    for d in spec.datasets:  # e.g. build an offline dataset once here, not concurrently in children
        entry_source(d).prepare(d)
    if not todo:
        return
    check = check_run(spec, todo, deep=True, progress=progress)  # before any training
    if check.problems:
        raise DataProblemsError(check.data, check.settings)
    for note in check.notes:
        _logger.warning("note: %s", note)


def _todo(out: Path, cells: List[Cell], retry_errors: bool, max_cells: Optional[int]) -> List[Cell]:
    """The cells of ``cells`` that ``out``'s results do not hold as finished, at most ``max_cells``."""
    todo = [c for c, _ in _pending(ResultStore(out / "results.jsonl"), cells, retry_errors)]
    return todo if max_cells is None else todo[:max_cells]


def _pending(store: ResultStore, cells: List[Cell],
             retry_errors: bool) -> List[Tuple[Cell, Optional[Dict[str, Any]]]]:
    """The cells ``store`` does not hold as finished, in order, each with its earlier record
    where that record's lr sweep lacks a trial the cell's sweep rule asks for now (its
    trials are then reused; see :func:`~.cell.sweep_pending`), else None."""
    latest = {r["key"]: r for r in store.latest()}
    out: List[Tuple[Cell, Optional[Dict[str, Any]]]] = []
    for c in cells:
        if c.key not in latest or not is_finished(latest[c.key], retry_errors):
            out.append((c, None))
        elif sweep_pending(c, latest[c.key]):
            out.append((c, latest[c.key]))
    return out


def _init_distributed(device: str) -> int:
    """Join the process group ``torchrun`` set up (NCCL on GPUs, gloo on CPUs); this process's rank."""
    import torch
    import torch.distributed as dist

    import datetime

    # long enough for the in-memory cells that rank 0 runs alone while the others wait
    timeout = datetime.timedelta(hours=12)
    if not dist.is_initialized():
        if device != "cpu" and torch.cuda.is_available():
            from mmengine.dist import init_dist

            # mmengine 0.10.7 builds timedelta(seconds=timeout) itself: it takes seconds, not a
            # timedelta (a timedelta raises TypeError there); it also sets the rank's CUDA device
            init_dist("pytorch", backend="nccl", timeout=int(timeout.total_seconds()))
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return dist.get_rank()


def cell_dir(out: Union[str, os.PathLike], cell: Cell) -> Path:
    """``<out>/cells/<12 hex digits of the cell key>``: where an mmengine cell keeps its config,
    logs and prompt checkpoint."""
    import hashlib

    return Path(out) / "cells" / hashlib.sha1(cell.key.encode()).hexdigest()[:12]


def _run_cell_distributed(cell: Cell, work_dir: Path, launcher: str, rank: int,
                          prior: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One cell in every process of a ``torchrun`` group (runner and mmengine engines: data
    parallel; memory engine: rank 0 alone); every process waits for the others before the next cell."""
    import torch.distributed as dist

    if cell.settings.get("engine") in _DATA_PARALLEL_ENGINES or rank == 0:
        # no try/except here: an exception in one process ends it, and torchrun then stops the
        # others (waiting for them in a barrier would hang the group until its timeout)
        rec = run_cell(cell, work_dir=work_dir, launcher=launcher, prior=prior)
    else:
        rec = {}
    rec["world_size"] = dist.get_world_size() if cell.settings.get("engine") in _DATA_PARALLEL_ENGINES else 1
    dist.barrier()
    return rec


def merge_results(out: Union[str, os.PathLike], sources: Sequence[Union[str, os.PathLike]]) -> int:
    """Append to ``<out>/results.jsonl`` every record of the sources' ``results.jsonl`` that it
    does not hold yet (e.g. the shards of one grid); returns how many were added."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        store = ResultStore(out / "results.jsonl")
        seen = {json.dumps(r, sort_keys=True) for r in store.load()}
        added = 0
        for src in sources:
            path = Path(src) / "results.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{src} holds no results.jsonl to merge")
            if path.resolve() == (out / "results.jsonl").resolve():
                continue
            for rec in ResultStore(path).load():
                line = json.dumps(rec, sort_keys=True)
                if line not in seen:
                    store.append(rec)
                    seen.add(line)
                    added += 1
    return added


def _run_benchmark_locked(spec: BenchmarkSpec, out: Path, cells: List[Cell], max_cells: Optional[int],
                          retry_errors: bool, progress: bool, report: bool, isolate: bool,
                          launcher: str = "none", rank: int = 0) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    store = ResultStore(out / "results.jsonl")
    if rank == 0:
        (out / "spec.json").write_text(json.dumps(spec.raw, indent=2) + "\n")
    pending = _pending(store, cells, retry_errors)  # again, under the lock
    todo = [c for c, _ in pending]
    priors = {c.key: prior for c, prior in pending if prior is not None}
    if launcher != "none":  # every process runs rank 0's list of cells
        import torch.distributed as dist

        keys = [[c.key for c in todo]]
        dist.broadcast_object_list(keys, src=0)
        todo = [c for c in cells if c.key in set(keys[0])]
    _logger.info("%s: %d cells, %d finished before, %d to run%s", spec.name, len(cells), len(cells) - len(todo),
                 len(todo), f" ({len(priors)} of them finished before, to extend their lr sweep)" if priors else "")
    if max_cells is not None:
        todo = todo[:max_cells]
    written = []
    bar = tqdm(total=len(todo), desc=f"benchmark {spec.name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in todo:
        bar.set_postfix_str(f"{cell.method} | {cell.backbone['name']} | {cell.dataset['name']} | "
                            f"{settings_label(cell.settings)} | seed {cell.seed}", refresh=True)
        work_dir = cell_dir(out, cell)
        if launcher != "none":
            rec = _run_cell_distributed(cell, work_dir, launcher, rank, priors.get(cell.key))
            if rank != 0:
                bar.update(1)
                continue
        elif isolate:
            rec = run_cell_in_child(cell, spec.cell_timeout_s, work_dir=work_dir, prior=priors.get(cell.key))
        else:
            try:
                rec = run_cell(cell, work_dir=work_dir, prior=priors.get(cell.key))
            except Exception:  # same record as a failed child: the traceback is the reason
                rec = error_record(cell, tail_lines(traceback.format_exc()), 0.0)
            if "peak_mem_kind" in rec and rec["peak_mem_kind"].startswith("cpu"):
                rec["peak_mem_kind"] += " (in-process, not isolated)"
        rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        store.append(rec)
        written.append(rec)
        if rec["status"] == "error":  # the reason in one line; the record keeps all of it
            _logger.warning("cell failed: %s | %s | %s | %s | seed %s: %s (full reason in %s)", cell.method,
                            cell.backbone["name"], cell.dataset["name"], settings_label(cell.settings), cell.seed,
                            reason_summary(rec.get("reason")), store.path)
        elif rec["status"] == "diverged":
            _logger.warning("cell diverged (recorded, not ranked): %s at step %s, lr %s", cell.method,
                            rec.get("diverged_at_step"), rec.get("diverged_lr"))
        bar.update(1)
    bar.close()
    if report:
        write_report(out)
    return written

