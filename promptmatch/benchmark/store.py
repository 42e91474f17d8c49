"""The result store of a benchmark output folder: ``results.jsonl`` and the run lock."""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Union

from .._locking import exclusive_lock

__all__ = ["ResultStore", "OutputLock", "BenchmarkLockedError", "latest_records", "is_finished"]

_logger = logging.getLogger(__name__)


def latest_records(records: Iterable[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    """The last record of each cell key among ``records`` (in the order the keys first
    appear): a cell recorded more than once counts once, as its latest record says."""
    latest: Dict[str, Mapping[str, Any]] = {}
    for r in records:
        latest[r["key"]] = r
    return list(latest.values())


def is_finished(record: Mapping[str, Any], retry_errors: bool = False) -> bool:
    """Whether a cell whose latest record is ``record`` counts as finished (``ok``,
    ``skipped`` and ``diverged``; ``error`` too unless ``retry_errors``)."""
    return not (retry_errors and record.get("status") == "error")


class BenchmarkLockedError(RuntimeError):
    """Another benchmark run is writing to the same output folder."""


def _locked_message(holder: str, out: Path) -> str:
    return (f"another benchmark run ({holder}) is writing to {out}; wait for it to finish, "
            "or give this run its own --out (reports of several folders can be merged later)")


class OutputLock:
    """An exclusive lock on a benchmark output folder for the length of a run.

    Held through ``flock`` on ``<out>/.lock`` (released by the kernel if the process dies,
    so a killed run never leaves a stale lock); a second run on the same folder gets
    :class:`BenchmarkLockedError` naming the process that holds it. Where ``fcntl`` does not
    exist (Windows), runs are not locked against each other.
    """

    def __init__(self, out: Union[str, os.PathLike]):
        self.path = Path(out) / ".lock"
        self._f = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            _logger.warning("no fcntl: %s is not locked against concurrent runs", self.path.parent)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise BenchmarkLockedError(_locked_message(holder, self.path.parent)) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    @staticmethod
    def check_free(out: Union[str, os.PathLike]) -> None:
        """Raise :class:`BenchmarkLockedError` if another run holds the lock on ``out``;
        creates and changes nothing (a run refused here leaves ``out`` as it was)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        path = Path(out) / ".lock"
        if not path.is_file():
            return  # no run has locked it yet
        with open(path, "r") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = f.read().strip() or "unknown process"
                raise BenchmarkLockedError(_locked_message(holder, path.parent)) from None
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def __exit__(self, *exc: Any) -> None:
        if self._f is not None:
            import fcntl

            self._f.seek(0)
            self._f.truncate()
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None


class ResultStore:
    """``results.jsonl``: one JSON record per finished cell, appended with flush + fsync.

    Each append holds an exclusive ``flock`` on the file, so writers in several processes
    never interleave their lines.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)

    def load(self) -> List[Dict[str, Any]]:
        """Every complete record; a malformed (e.g. truncated by a kill) line is skipped with a warning."""
        if not self.path.is_file():
            return []
        records = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                _logger.warning("%s:%d: ignoring a malformed (truncated?) line", self.path, n)
                continue
            if isinstance(rec, dict) and "key" in rec:
                records.append(rec)
        return records

    def latest(self) -> List[Dict[str, Any]]:
        """The latest record of every cell (a cell recorded again, e.g. a failed cell run again
        with ``--retry-errors``, counts once, as its last record says), in the order the cells
        were first recorded."""
        return list(latest_records(self.load()))

    def done_keys(self, retry_errors: bool = False) -> set:
        """Keys of finished cells, by their latest record (``ok``, ``skipped`` and
        ``diverged``; ``error`` too unless ``retry_errors``)."""
        return {r["key"] for r in self.latest() if is_finished(r, retry_errors)}

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line; starts a new line if the file ends in a truncated one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path, "ab+") as f, exclusive_lock(f):
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

