"""The benchmark tool: a grid of methods x backbones x datasets x settings x seeds.

A small spec file (JSON, or YAML when PyYAML is installed) describes the grid; see
``configs/benchmark/README.md`` and the profiles shipped in ``promptmatch/benchmark/profiles``.
Each *cell* (one method, backbone, dataset, setting and seed) trains and evaluates in a
child process of its own (``python -m promptmatch.benchmark --cell FILE``), so its peak
resident memory is its own, and its record is appended as one JSON line to
``<out>/results.jsonl`` (flushed and fsynced). A restarted run skips every cell whose key is
already there; a line truncated by a kill is ignored. ``write_report`` turns
``results.jsonl`` alone into ``report.md`` and PNG plots: mean and spread over seeds,
rankings of the methods and Kendall's tau-b between rankings.

Modules: :mod:`.spec` (specs, cells, profiles), :mod:`.entries` (typed method, backbone and
setting entries), :mod:`.sources` (dataset sources: one registered :class:`DataSource` per
kind of dataset entry), :mod:`.data` (the spec's datasets), :mod:`.validation` (everything a run
will meet, checked before it trains: the data and each cell's settings), :mod:`.store` (results
file, run lock), :mod:`.cell` and :mod:`.mmseg_cell` (one cell on the in-memory or the mmengine
engine), :mod:`.common` (what both cell engines share), :mod:`.runner` (the grid),
:mod:`.report` and :mod:`.plots`, :mod:`.cli`.

Python API::

    spec = load_spec(profile_path("quick"))               # or load_spec(path), validate_spec(dict)
    cells = expand_grid(spec)
    check_run(spec).problems                              # what --validate lists (a run refuses on them)
    run_benchmark(spec, "work_dirs/bench")                # resumable
    write_report("work_dirs/bench")                       # from results.jsonl alone
"""
from __future__ import annotations

from .cell import RECORD_VERSION, error_record, run_cell, run_cell_in_child
from .cli import main
from .report import aggregate, kendall_tau_b, write_report
from .runner import cell_dir, merge_results, run_benchmark
from .spec import (
    EFFICIENTNET_LITE0_WEIGHTS,
    PROFILE_DIR,
    SETTING_DEFAULTS,
    BenchmarkSpec,
    Cell,
    SpecError,
    cell_key,
    expand_grid,
    list_profiles,
    load_spec,
    profile_path,
    method_lrs,
    resolve_engine,
    settings_label,
    validate_spec,
)
from .data import DataProblemsError, check_spec_data
from .entries import BackboneEntry, MethodEntry
from .sources import DatasetEntry, DataSource, get_source, list_sources, register_source, unregister_source
from .store import BenchmarkLockedError, OutputLock, ResultStore
from .validation import RunCheck, check_run

__all__ = [
    "BenchmarkSpec",
    "Cell",
    "SpecError",
    "ResultStore",
    "OutputLock",
    "BenchmarkLockedError",
    "SETTING_DEFAULTS",
    "EFFICIENTNET_LITE0_WEIGHTS",
    "PROFILE_DIR",
    "RECORD_VERSION",
    "cell_key",
    "settings_label",
    "method_lrs",
    "resolve_engine",
    "DataProblemsError",
    "DataSource",
    "DatasetEntry",
    "register_source",
    "unregister_source",
    "get_source",
    "list_sources",
    "MethodEntry",
    "BackboneEntry",
    "check_spec_data",
    "check_run",
    "RunCheck",
    "cell_dir",
    "profile_path",
    "list_profiles",
    "load_spec",
    "validate_spec",
    "expand_grid",
    "run_cell",
    "run_cell_in_child",
    "error_record",
    "run_benchmark",
    "merge_results",
    "aggregate",
    "kendall_tau_b",
    "write_report",
    "main",
]
