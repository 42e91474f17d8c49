"""Atomic file writes that give the new file the mode any other file of the user gets.

A write goes to a temporary file next to its destination, which is renamed over the destination
once complete: a crash or an error leaves either the old file or the new one, never a part. The
temporary file is created with mode ``0o666`` and the process's umask applies to it, as to a
file opened with ``open(path, "w")`` (``0644`` under the usual umask ``022``, ``0600`` under
``077``); :func:`tempfile.mkstemp`'s private ``0600`` would carry over to the destination.
Standard library only: every layer may use it.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterator, Union

__all__ = ["PathLike", "new_temporary", "atomic_path", "atomic_write_bytes", "remove_stale_temporaries"]

PathLike = Union[str, "os.PathLike[str]"]

_PID_IN_TMP = re.compile(r"\.pid(\d+)\.")
_STALE_AFTER_S = 3600.0


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete temporary files that an earlier, killed write of ``path`` left behind: those of a
    process that no longer runs on this machine, or older than an hour."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        m = _PID_IN_TMP.search(tmp.name[len(path.name) + 1:])
        stale = False
        if m is not None:
            # os.kill(pid, 0) answers "does this process exist" only by raising
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                stale = True
            except (PermissionError, OverflowError, OSError):
                pass
        try:
            stale = stale or time.time() - tmp.stat().st_mtime > _STALE_AFTER_S
            if stale:
                tmp.unlink()
        except FileNotFoundError:  # another writer removed it first
            pass


def new_temporary(path: PathLike) -> Path:
    """Create an empty temporary file in ``path``'s folder (made if missing) for a later
    ``os.replace(tmp, path)``; its mode is ``0o666`` less the umask, as for any new file.

    Its name (``.<name>.pid<PID>.<random>.tmp``) lets :func:`remove_stale_temporaries` find it
    if the writing process dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.pid{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask (and default ACLs)
        except FileExistsError:  # pragma: no cover - 32 random bits clashed
            continue
        os.close(fd)
        return tmp


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; when the block ends without an
    exception the content is flushed to disk and renamed over ``path``, otherwise it is deleted
    and ``path`` is left as it was.

    For writers that take a file name (``PIL.Image.save(tmp, format="PNG")``,
    ``torch.onnx.export``): give them the format explicitly, the temporary name ends in ``.tmp``.
    Temporary files of earlier writes of ``path`` that were killed are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = new_temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)  # fsync needs a writable descriptor on some systems
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file; the new
    file gets the usual mode (``0o666`` less the umask)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
