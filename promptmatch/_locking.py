"""Cross-process file locks (``flock``) shared by the dataset builder and the benchmark store."""
from __future__ import annotations

import contextlib
from typing import IO, Any, Iterator

__all__ = ["exclusive_lock"]


@contextlib.contextmanager
def exclusive_lock(fh: IO[Any]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the open file ``fh`` for the block (waits for it).

    Where ``fcntl`` does not exist (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
